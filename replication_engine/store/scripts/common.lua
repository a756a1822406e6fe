-- Shared by every script and by the function library: key layout, placement, HLC arithmetic,
-- the version order, the checks every script makes before its first write, and the incremental
-- Merkle update. See docs/FORMAT.md and docs/DELETES.md.
--
-- Nothing here reads KEYS or ARGV: a script (or a function) first calls begin() with the
-- partition's key prefix ('P{0}'), the tree's geometry ('<fanout>/<depth>') and this node's id.
-- Scripts get them as ARGV[1..3]; the functions read them from the partition's meta. begin()
-- also clears what is cached per call, since a function library's upvalues outlive a call.
--
-- HLCs are 16-hex strings and digests 32-hex strings. Strings are compared byte by byte here,
-- never with Lua's < (which uses strcoll and so depends on the server's locale).
--
-- Redis does not roll a script back when it fails part way, so every script first checks
-- everything it can fail on (the type of each key it will write) and writes nothing when a
-- check fails: a store-wide key of the wrong type fails the whole call with Redis's own
-- message and the key's name; an item (or its leaf bucket or an ancestor) of the wrong type
-- fails that item alone.
local P, W, SELF, HLC_KEY, ROOT_KEY, TOMBS_KEY, CDC_KEY, REC, MK, ITEM
local FANOUT, DEPTH, BITS, BUCKET_DIV, HEX_PATH
-- A hash value longer than a listpack holds at the default hash-max-listpack-value (64): see
-- make_dense(). Built there, the first time a node is converted: a script runs this file anew
-- on every call, and building it up front cost a tenth of an apply call's fixed cost.
local WIDE
-- Local versions count writes on their origin; Lua numbers are exact only up to 2^53 - 1.
local MAX_VERSION = 9007199254740991
local MAX_MS = 281474976710655 -- 2^48 - 1: the HLC's millisecond part
-- What one call caches (claims read, ancestors checked, tree changes queued): see begin().
local CLAIMS, ANCESTOR_OK, LEAF_DELTA, LEAF_ORDER
-- Per call too: leaf path -> the first problem among its ancestors, or false.
local ANCESTORS_OF

-- Locals for what runs per item: Lua 5.1 looks a global (and each table field) up by hash on
-- every use, which costs more than the operation itself in these loops. Set by begin(): a
-- function library is loaded where Redis offers no commands and no standard libraries.
local call, pcall_, sub, byte, tonum, bxor, fmt

-- The leaf path of a key (docs/FORMAT.md, "Merkle tree"): the top DEPTH * BITS bits of SHA-1 of
-- the key's bytes, one fixed-width hex segment of BITS bits per level. Decided here, from the
-- key alone, so that no caller can place an item anywhere else.
local function path_of(key)
  -- Whole hex digits per level (fanout 16, 256, ...): the path is the digest's first digits.
  if HEX_PATH then return sub(redis.sha1hex(key), 1, HEX_PATH) end
  local bucket = math.floor(tonum(sub(redis.sha1hex(key), 1, 8), 16) / BUCKET_DIV)
  local out, unit = {}, 2 ^ BITS
  for level = DEPTH, 1, -1 do
    out[level] = fmt('%0' .. W .. 'x', bucket % unit)
    bucket = math.floor(bucket / unit)
  end
  return table.concat(out)
end

-- Set the partition and geometry this call works on (see the top of this file). geometry is
-- '<fanout>/<depth>', already validated by whoever wrote it.
local function begin(prefix, geometry, self_id)
  call, pcall_ = redis.call, redis.pcall
  sub, byte, tonum, bxor, fmt = string.sub, string.byte, tonumber, bit.bxor, string.format
  P, SELF = prefix, self_id
  local fanout, depth = string.match(geometry, '^(%d+)/(%d+)$')
  FANOUT, DEPTH = tonum(fanout), tonum(depth)
  BITS = math.floor(math.log(FANOUT) / math.log(2) + 0.5)
  W = math.floor((BITS + 3) / 4)
  BUCKET_DIV = 2 ^ (32 - DEPTH * BITS)
  HEX_PATH = BITS % 4 == 0 and DEPTH * W or nil
  HLC_KEY, ROOT_KEY, TOMBS_KEY = P .. 'hlc', P .. 'mk:root', P .. 'tombs'
  CDC_KEY, REC, MK, ITEM = P .. 'cdc', P .. 'node', P .. 'mk:', P .. 'item:'
  CLAIMS, ANCESTOR_OK, LEAF_DELTA, LEAF_ORDER, ANCESTORS_OF = {}, {}, {}, {}, {}
end

local function bytes_gt(a, b)
  if a == b then return false end
  local la, lb = #a, #b
  local n = la < lb and la or lb
  for i = 1, n do
    local x, y = byte(a, i), byte(b, i)
    if x ~= y then return x > y end
  end
  return la > lb
end

-- Orders two HLCs (16 hex characters each: 48-bit ms, 16-bit counter) numerically, with two
-- conversions instead of a loop over characters.
local function hlc_gt(a, b)
  local x, y = tonum(sub(a, 1, 12), 16), tonum(sub(b, 1, 12), 16)
  if x ~= y then return x > y end
  return tonum(sub(a, 13, 16), 16) > tonum(sub(b, 13, 16), 16)
end

-- The total order of two versions (docs/DELETES.md, "Total order"): HLC, then origin, then a
-- tombstone over a value, then the greater content hash. True when a is newer than b.
local function newer(a_hlc, a_origin, a_tomb, a_hash, b_hlc, b_origin, b_tomb, b_hash)
  if a_hlc ~= b_hlc then return hlc_gt(a_hlc, b_hlc) end
  if a_origin ~= b_origin then return bytes_gt(a_origin, b_origin) end
  if a_tomb ~= b_tomb then return a_tomb == '1' end
  return bytes_gt(a_hash, b_hash)
end

local function leaf_digest(key, hlc, hash, tomb)
  local text = #key .. ':' .. key .. '|' .. hlc .. '|' .. tomb .. '|' .. hash
  return string.sub(redis.sha1hex(text), 1, 32)
end

local function hlc_ms(hlc)
  return tonumber(string.sub(hlc, 1, 12), 16)
end

-- The next HLC after hlc, or nil at the end of the range (the caller refuses the write).
local function hlc_successor(hlc)
  local ms, counter = hlc_ms(hlc), tonumber(string.sub(hlc, 13, 16), 16)
  if counter >= 65535 then
    if ms >= MAX_MS then return nil end
    ms, counter = ms + 1, 0
  else
    counter = counter + 1
  end
  return string.format('%012x%04x', ms, counter)
end

-- How far ahead of its Redis's own clock (TIME) a client may stamp a local write, and an engine
-- propose the store clock: the default of `local.max_clock_offset_sec`, past which peers set a
-- version aside as clock skew anyway.
local CLOCK_LEAD_MAX_MS = 300000

-- The server's clock in milliseconds.
local function server_ms()
  local t = call('TIME')
  return tonum(t[1]) * 1000 + math.floor(tonum(t[2]) / 1000)
end

-- A client's proposed HLC, or the server's clock where the proposal is further ahead of it than
-- CLOCK_LEAD_MAX_MS. The store clock never goes back, so a proposal from a process whose clock
-- runs an hour ahead, taken, would stamp every later write here an hour ahead, whoever makes
-- it, long after that clock is put right; a proposal is only ever a lower bound anyway.
local function hlc_bounded(hlc)
  local now = server_ms()
  if hlc_ms(hlc) > now + CLOCK_LEAD_MAX_MS then return fmt('%012x0000', now) end
  return hlc
end

-- Advance the store clock past a timestamp applied from elsewhere.
local function hlc_observe(hlc)
  local last = call('GET', HLC_KEY)
  if not last or bytes_gt(hlc, last) then
    call('SET', HLC_KEY, hlc)
  end
end

-- ------------------------------------------------------------------------ checks before writing

-- On a Redis Cluster, a slot migration (CLUSTER SETSLOT ... MIGRATING / IMPORTING, then MIGRATE
-- key batch by key batch) leaves a partition's keys split between two masters. Redis routes a
-- call by the keys it declares, and a call declares one; the keys it touches besides (the
-- stream, the tree, the record) may not have moved yet, and a write to one of those on the
-- target would make a second copy of it there (MIGRATE then fails with BUSYKEY, and REPLACE
-- drops one copy's writes). So no call runs while its partition's slot moves: it reads two keys
-- of the slot that never exist, which fails on either master during a migration (the source
-- answers ASK for them, the target TRYAGAIN or "non local key") and reads 0 otherwise. The
-- reply is a TRYAGAIN error, which clients retry; nothing has been read or written yet. Any
-- other failure of the read (a caller whose ACL denies it) is returned as it is, saying what
-- the read was for: retrying would not help.
-- tag is the partition's key prefix ('P{0}'). Returns nil, or the error reply.
local CLUSTER_STATES = {'non local key', 'ASK', 'MOVED', 'TRYAGAIN', 'CLUSTERDOWN'}
local function slot_moving(tag)
  local probe = redis.pcall('EXISTS', tag .. 'never:1', tag .. 'never:2')
  if type(probe) ~= 'table' or not probe.err then return nil end
  for _, state in ipairs(CLUSTER_STATES) do
    if string.find(probe.err, state, 1, true) then
      return redis.error_reply('TRYAGAIN the hash slot of ' .. tag .. ' is migrating ' ..
        'between cluster masters; nothing was read or written: retry when the migration ends')
    end
  end
  return redis.error_reply(probe.err .. ' (every call of the store first reads ' .. tag ..
    'never:1 and ' .. tag .. 'never:2 with EXISTS, to refuse while a slot migrates: grant ' ..
    'the caller EXISTS on them)')
end

local function fail(key, message)
  return redis.error_reply(message .. ' (key ' .. key .. ')')
end

-- nil when key is absent or of one of the allowed types, else Redis's own complaint.
local function bad_type(key, allowed)
  local t = call('TYPE', key)
  t = t.ok or t
  if t == 'none' or t == allowed then return nil end
  return 'WRONGTYPE Operation against a key holding the wrong kind of value: ' .. key ..
    ' is a ' .. t .. ', expected a ' .. allowed
end

-- The store-wide keys a script writes: (key, type) pairs. Returns an error reply or nil.
-- The message starts 'WRONGTYPE store key', which tells the client that no item is to blame.
local function check_store_keys(keys)
  for i = 1, #keys, 2 do
    local problem = bad_type(keys[i], keys[i + 1])
    if problem then
      return redis.error_reply('WRONGTYPE store key ' .. string.sub(problem, 68))
    end
  end
  return nil
end

-- Ancestors of leaf buckets, checked once each per call: path -> error text or false.
local function ancestors_problem(path)
  local cached = ANCESTORS_OF[path]
  if cached ~= nil then return cached or nil end
  local depth = #path / W
  for level = 0, depth - 1 do
    local node = sub(path, 1, level * W)
    local known = ANCESTOR_OK[node]
    if known == nil then
      known = bad_type(MK .. node, 'hash') or false
      ANCESTOR_OK[node] = known
    end
    if known then
      ANCESTORS_OF[path] = known
      return known
    end
  end
  ANCESTORS_OF[path] = false
  return nil
end

-- The current version of a key, as the fields write_item and the apply rule need, or
-- (nil, error text) when the key holds something other than a hash. Every absent key shares
-- one (read-only) table: a batch of new keys then allocates nothing here.
local ABSENT = {hash = ''}
local function read_item(key)
  local f = pcall_('HMGET', ITEM .. key, 'hlc', 'o', 'h', 'del', 'v', 'tp', 'g')
  if f.err then return nil, f.err end
  if not f[1] then return ABSENT end
  return {hlc = f[1], origin = f[2], hash = f[3] or '', del = f[4], version = f[5], tp = f[6],
          digest = f[7]}
end

-- What can make writing one item fail, bar its leaf bucket: the item key (read here) and the
-- bucket's ancestors (checked once per call). Returns the current version, or (nil, error
-- text). The leaf bucket is the first thing write_item writes, so a wrong type there fails
-- before anything of the item is written (one call fewer per item than a TYPE check).
local function read_checked(key, path)
  local cur, problem = read_item(key)
  if not cur then return nil, problem end
  problem = ancestors_problem(path)
  if problem then return nil, problem end
  return cur
end

-- For scripts that remove items (gc, discard): the leaf bucket checked up front too.
local function read_checked_leaf(key, path)
  local cur, problem = read_checked(key, path)
  if not cur then return nil, problem end
  local known = ANCESTOR_OK[path]
  if known == nil then
    known = bad_type(MK .. path, 'hash') or false
    ANCESTOR_OK[path] = known
  end
  if known then return nil, known end
  return cur
end

-- ------------------------------------------------------------------------ claims

-- This store's claims, read once per origin per call (docs/DELETES.md, "Claims").
local function claim_of(origin)
  local c = CLAIMS[origin]
  if c == nil then
    c = call('HGET', REC, origin == SELF and 'self' or ('c:' .. origin)) or false
    CLAIMS[origin] = c
  end
  return c
end

-- Raise claims from a flat list of origin, hlc pairs starting at ARGV[first]. A claim about
-- this node's own writes is never taken from elsewhere: only certification sets it.
local function raise_claims(first)
  for i = first, #ARGV, 2 do
    local origin, hlc = ARGV[i], ARGV[i + 1]
    if origin ~= SELF and #hlc == 16 and hlc ~= '0000000000000000' then
      local field = 'c:' .. origin
      local cur = call('HGET', REC, field)
      if not cur or hlc_gt(hlc, cur) then call('HSET', REC, field, hlc) end
    end
  end
end

-- An anchor field ('p:<peer>'): token, fixed-width position, anchored flag, and for an
-- unanchored one the position from which the stream was applied contiguously again (a repair
-- that began at or after it covers the gap before it).
local function read_anchor(src)
  local raw = call('HGET', REC, 'p:' .. src)
  if not raw then return nil end
  local token, pos, flag, since = string.match(raw, '^([^|]*)|(%d+%-%d+)|([01])|?([^|]*)$')
  if not token or #pos ~= 41 then return nil end
  return {token = token, pos = pos, anchored = flag == '1', since = since}
end

local function write_anchor(src, token, pos, anchored, since)
  local raw = token .. '|' .. pos .. '|' .. (anchored and '1' or '0')
  if not anchored then raw = raw .. '|' .. (since or pos) end
  call('HSET', REC, 'p:' .. src, raw)
end

-- This store's own record has not gone back since the caller read it: same incarnation, and
-- a certification count at least the one read.
local function record_unmoved(inc, cert)
  local f = call('HMGET', REC, 'inc', 'cert')
  return f[1] == inc and (tonumber(f[2]) or 0) >= (tonumber(cert) or 0)
end

-- ------------------------------------------------------------------------ the Merkle tree

-- Ancestor updates are accumulated per script call and written once by tree_flush(): a batch
-- of 1,000 items touches the root and the upper levels once, not 1,000 times. XOR commutes, so
-- the result is the same as updating them item by item. Deltas are kept per leaf bucket, keyed
-- by the leaf path the caller already holds: building the ancestors' names per item cost the
-- apply path more than the writes themselves, so that happens once per bucket, in the flush.

-- Set (new_digest) or clear (false) one key's leaf and queue the change for every ancestor.
-- old is the key's current leaf digest (false if none): callers derive it from the item they
-- already read, which the atomic write path guarantees matches the leaf.
-- w1..w4, when given, are new_digest as its four 32-bit words (the apply path sends them
-- ready, which saves this single-threaded server eight conversions per item).
local function tree_set(path, key, new_digest, old, w1, w2, w3, w4)
  local d1, d2, d3, d4 = 0, 0, 0, 0
  if new_digest then
    local done = pcall_('HSET', MK .. path, key, new_digest)
    if type(done) == 'table' and done.err then return done.err end
    if w1 then
      d1, d2, d3, d4 = w1, w2, w3, w4
    else
      d1, d2 = tonum(sub(new_digest, 1, 8), 16), tonum(sub(new_digest, 9, 16), 16)
      d3, d4 = tonum(sub(new_digest, 17, 24), 16), tonum(sub(new_digest, 25, 32), 16)
    end
  else
    call('HDEL', MK .. path, key)
  end
  if old then
    d1, d2 = bxor(d1, tonum(sub(old, 1, 8), 16)), bxor(d2, tonum(sub(old, 9, 16), 16))
    d3, d4 = bxor(d3, tonum(sub(old, 17, 24), 16)), bxor(d4, tonum(sub(old, 25, 32), 16))
  end
  local acc = LEAF_DELTA[path]
  if acc then
    acc[1], acc[2], acc[3], acc[4] = bxor(acc[1], d1), bxor(acc[2], d2), bxor(acc[3], d3),
      bxor(acc[4], d4)
  else
    LEAF_DELTA[path] = {d1, d2, d3, d4}
    LEAF_ORDER[#LEAF_ORDER + 1] = path
  end
  return nil
end

local function is_zero(w)
  return w[1] == 0 and w[2] == 0 and w[3] == 0 and w[4] == 0
end

-- A stored digest (hash field or string, 32 hex; nil if absent) XOR a delta, as 32 hex, or
-- false at zero (zero digests are not stored). bit ops return signed 32-bit numbers; % 2^32
-- brings them back to what %08x prints.
local TWO32 = 4294967296
local function store_xor(current, delta)
  local a, b, c, d = delta[1], delta[2], delta[3], delta[4]
  if current then
    a, b = bxor(a, tonum(sub(current, 1, 8), 16)), bxor(b, tonum(sub(current, 9, 16), 16))
    c, d = bxor(c, tonum(sub(current, 17, 24), 16)), bxor(d, tonum(sub(current, 25, 32), 16))
  end
  if a == 0 and b == 0 and c == 0 and d == 0 then return false end
  return fmt('%08x%08x%08x%08x', a % TWO32, b % TWO32, c % TWO32, d % TWO32)
end

-- HMGET/HSET/HDEL of at most this many fields per call: Lua's unpack() has a stack limit, and a
-- bounded reply keeps one call's memory small whatever the fanout.
local FIELDS_PER_CALL = 1000

-- An interior node of many children is kept by Redis as a listpack (a hash of up to 512
-- entries is one by default, so a node of 256 children always is), where reading or writing one
-- field scans the node from its start. At the default fanout those scans were a third of the
-- apply script's cost. Past DENSE_FIELDS children a node is turned into a hash table: writing a
-- field longer than a listpack may hold makes Redis convert the hash, and the field is removed
-- in the same call, so no reader ever sees it and the node holds exactly what it held. Redis
-- does not convert a hash back while it runs; a node that comes back as a listpack (from an
-- RDB, or under a hash-max-listpack-value larger than WIDE) is tried again at its next write.
-- Memory: about 46 more bytes per child of an interior node (MEMORY USAGE of a node of 243
-- children: 10,288 -> 21,592 bytes), 3 MB for a full tree of the default geometry; leaves stay
-- listpacks.
local DENSE_FIELDS = 64

-- added: how many children this call may add (the node is judged by its size after the call).
-- A caller whose ACL lacks OBJECT (an application's writer, say) leaves the node as it is: the
-- engine's own calls convert it.
local function make_dense(hash, added)
  local encoding = pcall_('OBJECT', 'ENCODING', hash)
  if (encoding == 'listpack' or encoding == 'ziplist')
      and call('HLEN', hash) + added >= DENSE_FIELDS then
    WIDE = WIDE or string.rep('-', 1025)
    call('HSET', hash, '~', WIDE)
    call('HDEL', hash, '~')
  end
end

-- Write the queued changes one level at a time, from the leaves' parents up to the root: one
-- HMGET and one HSET per interior node (per FIELDS_PER_CALL children) rather than a read and a
-- write per child. A node's own delta is the XOR of its children's, and is what its parent
-- gets. Every script that calls tree_set ends with this; read_checked has checked every node it
-- writes.
local function tree_flush()
  local deltas, order = LEAF_DELTA, LEAF_ORDER
  while #order > 0 do
    local width = #order[1] - W
    if width < 0 then break end -- the root: its delta goes to ROOT_KEY below
    local parents, parent_order, children_of = {}, {}, {}
    for i = 1, #order do
      local path = order[i]
      local delta = deltas[path]
      if not is_zero(delta) then
        local parent = sub(path, 1, width)
        local acc = parents[parent]
        if acc then
          acc[1], acc[2], acc[3], acc[4] = bxor(acc[1], delta[1]), bxor(acc[2], delta[2]),
            bxor(acc[3], delta[3]), bxor(acc[4], delta[4])
          local kids = children_of[parent]
          kids[#kids + 1] = path
        else
          parents[parent] = {delta[1], delta[2], delta[3], delta[4]}
          parent_order[#parent_order + 1] = parent
          children_of[parent] = {path}
        end
      end
    end
    for p = 1, #parent_order do
      local parent = parent_order[p]
      local hash = MK .. parent
      local kids = children_of[parent]
      make_dense(hash, #kids)
      for first = 1, #kids, FIELDS_PER_CALL do
        local last = math.min(#kids, first + FIELDS_PER_CALL - 1)
        local fields = {}
        for i = first, last do fields[i - first + 1] = sub(kids[i], width + 1) end
        local current = call('HMGET', hash, unpack(fields))
        local set, gone = {'HSET', hash}, {'HDEL', hash}
        for i = 1, #fields do
          local value = store_xor(current[i], deltas[kids[first + i - 1]])
          if value then
            set[#set + 1], set[#set + 2] = fields[i], value
          else
            gone[#gone + 1] = fields[i]
          end
        end
        if #set > 2 then call(unpack(set)) end
        if #gone > 2 then call(unpack(gone)) end
      end
    end
    deltas, order = parents, parent_order
  end
  local root = deltas['']
  if root and not is_zero(root) then
    local value = store_xor(call('GET', ROOT_KEY), root)
    if value then
      call('SET', ROOT_KEY, value)
    else
      call('DEL', ROOT_KEY)
    end
  end
end

local function current_digest(key, cur)
  if not cur.hlc then return false end
  return cur.digest or leaf_digest(key, cur.hlc, cur.hash, cur.del)
end

-- Write one item version over cur (from read_checked): its tree leaf first, then the item
-- hash and the tombstone index. digest (and w1..w4, its four 32-bit words) is the version's
-- leaf digest when the caller knows it (the apply path computes it client-side, off this
-- single-threaded server), else nil. Returns nil, or Redis's error when the leaf bucket holds
-- the wrong type (and then nothing of the item was written).
local function write_item(key, path, tomb, data, hash, hlc, origin, ct, version, updated_at, tp,
                          cur, digest, w1, w2, w3, w4)
  local item = ITEM .. key
  digest = digest or leaf_digest(key, hlc, hash, tomb)
  local refused = tree_set(path, key, digest, current_digest(key, cur), w1, w2, w3, w4)
  if refused then return refused end
  if tomb == '0' and tp == '' and not cur.tp and cur.del ~= '1' then
    -- The common case (a value over a value or over nothing, no trace) in one call, without
    -- building and unpacking an argument table.
    call('HSET', item, 'hlc', hlc, 'o', origin, 'del', tomb, 'v', version, 'ts', updated_at,
      'g', digest, 'd', data, 'h', hash, 'ct', ct)
    return nil
  end
  local fields = {'HSET', item, 'hlc', hlc, 'o', origin, 'del', tomb, 'v', version,
                  'ts', updated_at, 'g', digest}
  local stale = false
  if tomb == '1' then
    if cur.hlc and cur.del ~= '1' then stale = {'HDEL', item, 'd', 'h', 'ct'} end
    call('ZADD', TOMBS_KEY, hlc_ms(hlc), key)
  else
    fields[15], fields[16], fields[17], fields[18], fields[19], fields[20] =
      'd', data, 'h', hash, 'ct', ct
    if cur.del == '1' then call('ZREM', TOMBS_KEY, key) end
  end
  if tp ~= '' then
    fields[#fields + 1], fields[#fields + 2] = 'tp', tp
  elseif cur.tp then
    stale = stale or {'HDEL', item}
    stale[#stale + 1] = 'tp'
  end
  if stale then call(unpack(stale)) end
  call(unpack(fields))
  return nil
end

-- Remove one key's version (collected or dropped): the item, its leaf, its tombstone entry.
local function remove_item(key, path, cur)
  call('DEL', ITEM .. key)
  tree_set(path, key, false, current_digest(key, cur))
  if cur.del == '1' then call('ZREM', TOMBS_KEY, key) end
end

-- Append one version to this node's CDC stream; returns the entry id. meta is the entry's
-- meta JSON when the caller could build it (the apply path does, client-side); a local write
-- learns its hlc and version only in here, so its meta is built here.
local function emit(maxlen, key, tomb, data, hash, hlc, origin, ct, version, updated_at, tp, meta)
  if not meta or meta == '' then
    -- From the decimal strings the caller validated, not Lua numbers: cjson prints numbers
    -- with 14 significant digits, which would corrupt large values.
    meta = '{"version":' .. version .. ',"updated_at":' .. updated_at .. ',"hlc":"' .. hlc ..
      '","origin":' .. cjson.encode(origin)
    if tp ~= '' then meta = meta .. ',"trace_parent":' .. cjson.encode(tp) end
    if tomb ~= '1' then meta = meta .. ',"content_type":' .. cjson.encode(ct) end
    meta = meta .. '}'
  end
  if tomb == '1' then
    return call('XADD', CDC_KEY, 'MAXLEN', '~', maxlen, '*', 'op', 'DEL', 'key', key,
      'meta', meta)
  end
  return call('XADD', CDC_KEY, 'MAXLEN', '~', maxlen, '*',
    'op', 'PUT', 'key', key, 'hash', hash, 'data', data, 'meta', meta)
end
