-- The store's write and read API for every language (docs/FORMAT.md, "Functions"): loaded as
-- the Redis Functions library 'replication_engine' on Redis 7, run as one EVALSHA script on
-- Redis 6.2 (ARGV[1] then names the function). Follows common.lua.
--
-- A caller declares each item key, '<prefix>{<partition>}item:<key>', and nothing else. The
-- function reads the partition's meta (same hash tag, so same slot), works out from the key
-- itself which partition and leaf bucket it belongs in, and refuses the whole call, writing
-- nothing, when a declared key is in the wrong partition or the store cannot take it. Every
-- key it touches shares the declared key's hash tag: one Redis Cluster slot per call.
local LIBRARY_VERSION = 7
local MAX_KEY_BYTES = 4096
local MAX_CONTENT_TYPE = 256
local MAX_TRACE_PARENT = 256
-- One call runs while the whole server waits: its size is bounded like everything else.
local MAX_KEYS_PER_CALL = 10000
local ZSTD_MAGIC = '\40\181\47\253'

local function refuse(message)
  return {err = 'ERR ' .. message}
end

-- Valid UTF-8 as Python decodes it (no overlongs, no surrogates, nothing past U+10FFFF), which
-- is what every peer requires of a key.
local function valid_utf8(s)
  if not string.find(s, '[\128-\255]') then return true end
  local i, n = 1, #s
  while i <= n do
    local c = byte(s, i)
    local extra, lo, hi = 0, 0x80, 0xBF
    if c < 0x80 then extra = 0
    elseif c >= 0xC2 and c <= 0xDF then extra = 1
    elseif c >= 0xE0 and c <= 0xEF then
      extra = 2
      if c == 0xE0 then lo = 0xA0 elseif c == 0xED then hi = 0x9F end
    elseif c >= 0xF0 and c <= 0xF4 then
      extra = 3
      if c == 0xF0 then lo = 0x90 elseif c == 0xF4 then hi = 0x8F end
    else return false end
    if i + extra > n then return false end
    for j = i + 1, i + extra do
      local d = byte(s, j)
      if j == i + 1 then
        if d < lo or d > hi then return false end
      elseif d < 0x80 or d > 0xBF then
        return false
      end
    end
    i = i + extra + 1
  end
  return true
end

local function le_bytes(n, count)
  local out = {}
  for i = 1, count do
    out[i] = string.char(n % 256)
    n = math.floor(n / 256)
  end
  return table.concat(out)
end

-- A plain value that begins with the zstd magic would read back as a compressed frame, so it is
-- stored inside one: a frame of raw (uncompressed) blocks, which any zstd decoder returns as is.
local function raw_frame(value)
  local parts = {ZSTD_MAGIC, '\160', le_bytes(#value, 4)} -- single segment, 4-byte size
  local block, at = 131072, 1
  repeat
    local chunk = sub(value, at, at + block - 1)
    at = at + #chunk
    local last = at > #value and 1 or 0
    parts[#parts + 1] = le_bytes(last + #chunk * 8, 3) .. chunk
  until at > #value
  return table.concat(parts)
end

-- The partition's meta, as the call needs it (this runs before begin(), so it names the
-- standard functions in full): {prefix, part, maxlen, max_payload, partitions}
-- after begin(), or nil and the refusal.
local function open_partition(declared)
  local open = string.find(declared, '{', 1, true)
  local close = open and string.find(declared, '}', open + 1, true)
  if not close or string.sub(declared, close + 1, close + 5) ~= 'item:' then
    return nil, refuse('declared key ' .. declared .. ' is not an item key: expected ' ..
      '<prefix>{<partition>}item:<key> (docs/FORMAT.md, "Functions")')
  end
  local prefix, part = string.sub(declared, 1, open - 1), string.sub(declared, open + 1, close - 1)
  local tag = prefix .. '{' .. part .. '}'
  local moving = slot_moving(tag)
  if moving then return nil, moving end
  local m = redis.call('HMGET', tag .. 'meta', 'format', 'fanout', 'depth', 'partitions', 'id',
    'maxlen', 'max_payload')
  if not m[1] then
    return nil, refuse('no store partition at ' .. tag .. ': ' .. tag .. 'meta is missing. ' ..
      'The store is created when its engine first opens it (or by `replication-engine ' ..
      'functions load --config FILE`); check the prefix and the partition')
  end
  if m[1] ~= '2' then
    return nil, refuse('store at ' .. tag .. ' is in format ' .. m[1] .. '; this library ' ..
      'writes format 2')
  end
  begin(tag, m[2] .. '/' .. m[3], m[5])
  return {prefix = prefix, part = part, tag = tag, maxlen = m[6] or '100000',
          max_payload = tonum(m[7]) or 67108864, partitions = tonum(m[4]) or 1}
end

-- The partition a key belongs in: '0' in a store of one partition, else the first level of its
-- leaf path.
local function partition_of(key, store)
  if store.partitions == 1 then return '0' end
  return sub(path_of(key), 1, W)
end

-- The application keys of the declared item keys, all checked, or nil and the refusal.
local function declared_keys(keys, store)
  local out = {}
  for i = 1, #keys do
    local name = keys[i]
    if sub(name, 1, #store.tag + 5) ~= store.tag .. 'item:' then
      return nil, refuse('declared key ' .. name .. ' is not an item key of ' .. store.tag ..
        ': one call writes one partition (one slot)')
    end
    local key = sub(name, #store.tag + 6)
    if #key == 0 or #key > MAX_KEY_BYTES then
      return nil, refuse('key of ' .. #key .. ' bytes: a key is 1..' .. MAX_KEY_BYTES ..
        ' bytes')
    end
    if not valid_utf8(key) then return nil, refuse('key ' .. name .. ' is not valid UTF-8') end
    local want = partition_of(key, store)
    if want ~= store.part then
      return nil, refuse('wrong partition: key ' .. key .. ' belongs in partition {' .. want ..
        '}, so declare ' .. store.prefix .. '{' .. want .. '}item:' .. key .. ', not ' .. name ..
        ' (docs/FORMAT.md, "Placement"); nothing was written')
    end
    out[i] = key
  end
  return out
end

local function is_hex(s, lengths)
  return lengths[#s] and not string.find(s, '[^0-9a-f]')
end
local HASH_LENGTHS = {[32] = true, [40] = true, [64] = true}
local HLC_LENGTH = {[16] = true}

-- The server's clock as an HLC proposal and as milliseconds.
local function server_now()
  local ms = server_ms()
  return fmt('%012x0000', ms), fmt('%d', ms)
end

-- One version written as a local write over cur, the key's current version (read and
-- type-checked by write_all): the body every public write shares. w = {key, tomb, data, hash,
-- proposed hlc, content type, updated_at, trace parent}; last is the store clock. Returns
-- {hlc, stream id}, or nil and the refusal.
local function write_local(w, store, path, cur, last)
  local key, tomb = w[1], w[2]
  local hlc = w[5]
  if last and not bytes_gt(hlc, last) then
    hlc = hlc_successor(last)
    if not hlc then
      return nil, fail(HLC_KEY, 'ERR HLC exhausted: the store clock ' .. last ..
        ' is at the end of the 48-bit millisecond range; no later timestamp exists')
    end
  end
  -- A peer's version counter near 2^53 must not overflow (Lua numbers are doubles).
  local previous = tonum(cur.version) or 0
  if previous ~= previous or previous < 0 or previous >= MAX_VERSION then
    previous = MAX_VERSION - 1
  end
  local version = fmt('%d', previous + 1)
  call('SET', HLC_KEY, hlc)
  local why = write_item(key, path, tomb, w[3], w[4], hlc, SELF, w[6], version, w[7], w[8], cur)
  if why then return nil, fail(MK .. path, why) end
  local sid = emit(store.maxlen, key, tomb, w[3], w[4], hlc, SELF, w[6], version, w[7], w[8])
  return {hlc, sid}
end

-- Local writes this store takes none of, whoever the client: checked here, where every
-- client's writes pass, and not only by the Python store. A follower mirrors its upstream,
-- so a write here would never leave it and would stay different from it for good. A node
-- the mesh forgot (docs/DELETES.md, "Membership") has every member drop its writes from then
-- on, its own store included, so a write taken here would be acknowledged and then lost. Its
-- record says both (`mode`, written when its engine opens it, and `forgotten`, when the
-- engine learns it). The error codes let a client tell these from a refused argument.
local function writes_refused()
  local r = call('HMGET', REC, 'mode', 'forgotten')
  if r[1] == 'follower' then
    return {err = 'FOLLOWER node ' .. SELF .. ' is a follower: it takes no local writes ' ..
      '(they would never leave it); nothing was written. Write to its upstream'}
  end
  if r[2] and string.find(',' .. r[2] .. ',', ',' .. SELF .. ',', 1, true) then
    return {err = 'FORGOTTEN the mesh forgot node ' .. SELF .. ': every member drops its ' ..
      'writes, so it takes none; nothing was written. To bring the machine back, wipe its ' ..
      'store and give it a new node id'}
  end
  return nil
end

-- Check everything a batch can fail on, then write it: a refused call writes nothing.
local function write_all(keys, writes, store)
  local problem = check_store_keys({HLC_KEY, 'string', ROOT_KEY, 'string', TOMBS_KEY, 'zset',
    CDC_KEY, 'stream', REC, 'hash'})
  if problem then return problem end
  problem = writes_refused()
  if problem then return problem end
  local paths, curs, seen = {}, {}, {}
  for i = 1, #writes do
    local w = writes[i]
    if w[2] == '0' and #w[3] > store.max_payload then
      return refuse('value of ' .. #w[3] .. ' bytes for key ' .. w[1] .. ' is over the ' ..
        'store\'s payload limit of ' .. store.max_payload .. ' bytes; nothing was written')
    end
    if #w[6] > MAX_CONTENT_TYPE or #w[8] > MAX_TRACE_PARENT then
      return refuse('content type and trace parent are at most ' .. MAX_CONTENT_TYPE ..
        ' bytes; nothing was written')
    end
    -- Both travel in the entry's JSON meta, which every peer decodes as UTF-8.
    if not valid_utf8(w[6]) or not valid_utf8(w[8]) then
      return refuse('content type and trace parent must be valid UTF-8; nothing was written')
    end
    local path = path_of(w[1])
    local cur, why = read_checked_leaf(w[1], path)
    if not cur then return fail(keys[i], why) end
    -- A key written twice in one call is read again before its second write (false here).
    paths[i], curs[i], seen[w[1]] = path, not seen[w[1]] and cur, true
  end
  local out, last = {}, call('GET', HLC_KEY)
  for i = 1, #writes do
    local done, why = write_local(writes[i], store, paths[i], curs[i] or read_item(writes[i][1]),
      last)
    if not done then return why end
    out[i], last = done, done[1]
  end
  tree_flush()
  return out
end

-- A plain value from a client: stored raw (wrapped in a raw zstd frame if it starts with the
-- zstd magic), with its SHA-1 as the content hash.
local function plain(key, value, ct, hlc, ms)
  local data = value
  if sub(value, 1, 4) == ZSTD_MAGIC then data = raw_frame(value) end
  return {key, '0', data, redis.sha1hex(value), hlc, ct, ms, ''}
end

local function prepare(keys)
  if #keys == 0 then return nil, nil, refuse('declare at least one item key') end
  if #keys > MAX_KEYS_PER_CALL then
    return nil, nil, refuse(#keys .. ' keys in one call; at most ' .. MAX_KEYS_PER_CALL ..
      ' (the server serves nothing else while a call runs): split the batch')
  end
  local store, why = open_partition(keys[1])
  if not store then return nil, nil, why end
  local names
  names, why = declared_keys(keys, store)
  if not names then return nil, nil, why end
  return store, names
end

-- re_put: KEYS[1] = the item key; ARGV = value [, content type]. Returns {hlc, stream id}.
local function re_put(keys, args)
  if #keys ~= 1 or #args < 1 or #args > 2 then
    return refuse('re_put takes 1 key and 1 or 2 arguments: value [content type]')
  end
  local store, names, why = prepare(keys)
  if not store then return why end
  local hlc, ms = server_now()
  local reply = write_all(keys, {plain(names[1], args[1], args[2] or 'binary', hlc, ms)}, store)
  if reply.err then return reply end
  return reply[1]
end

-- re_put_many: KEYS = item keys; ARGV = value, content type for each. Returns {hlc, stream id}
-- for each, in order.
local function re_put_many(keys, args)
  if #args ~= 2 * #keys then
    return refuse('re_put_many takes a value and a content type for each declared key')
  end
  local store, names, why = prepare(keys)
  if not store then return why end
  local hlc, ms = server_now()
  local writes = {}
  for i = 1, #names do
    writes[i] = plain(names[i], args[2 * i - 1], args[2 * i], hlc, ms)
  end
  return write_all(keys, writes, store)
end

-- re_del: KEYS[1] = the item key; ARGV = [trace parent]. Writes a tombstone (a delete
-- replicates like a value). Returns {hlc, stream id}.
local function re_del(keys, args)
  if #keys ~= 1 or #args > 1 then
    return refuse('re_del takes 1 key and at most 1 argument: [trace parent]')
  end
  local store, names, why = prepare(keys)
  if not store then return why end
  local hlc, ms = server_now()
  local reply = write_all(keys, {{names[1], '1', '', '', hlc, '', ms, args[1] or ''}}, store)
  if reply.err then return reply end
  return reply[1]
end

-- re_write: KEYS = item keys; ARGV = six per key: payload as on the wire (zstd frame or raw),
-- content hash of the uncompressed value (32, 40 or 64 hex), content type, proposed HLC
-- (16 hex, or '' for the server's clock), updated_at ms ('' for the server's clock), trace
-- parent ('' for none). For clients that compress, trace or keep their own clock (the Python
-- RedisStore is one). Returns {hlc, stream id} for each.
local function re_write(keys, args)
  if #args ~= 6 * #keys then
    return refuse('re_write takes six arguments for each declared key: payload, content ' ..
      'hash, content type, proposed hlc, updated_at ms, trace parent')
  end
  local store, names, why = prepare(keys)
  if not store then return why end
  local now_hlc, now_ms = server_now()
  local writes = {}
  for i = 1, #names do
    local a = 6 * (i - 1)
    local hash, hlc, ms = args[a + 2], args[a + 4], args[a + 5]
    if not is_hex(hash, HASH_LENGTHS) then
      return refuse('content hash for key ' .. names[i] .. ' must be 32, 40 or 64 ' ..
        'lower-case hex characters')
    end
    -- A hash this code can check is checked: a raw payload with a SHA-1. Others (xxh3, or a
    -- compressed payload) are checked by every peer on receipt.
    local data = args[a + 1]
    if #hash == 40 and sub(data, 1, 4) ~= ZSTD_MAGIC and redis.sha1hex(data) ~= hash then
      return refuse('content hash for key ' .. names[i] .. ' is not the SHA-1 of the ' ..
        'payload; nothing was written')
    end
    if hlc == '' then hlc = now_hlc end
    if ms == '' then ms = now_ms end
    if not is_hex(hlc, HLC_LENGTH) or string.find(ms, '%D') then
      return refuse('proposed hlc must be 16 lower-case hex and updated_at decimal ms')
    end
    hlc = hlc_bounded(hlc)
    writes[i] = {names[i], '0', args[a + 1], hash, hlc, args[a + 3], ms, args[a + 6]}
  end
  return write_all(keys, writes, store)
end

-- re_get (read-only): KEYS[1] = the item key. Returns nil when the key holds no value (absent
-- or deleted), else {payload, 'zstd' | 'raw', content type, hlc, origin, version, updated_at}.
local function re_get(keys, args)
  if #keys ~= 1 or #args ~= 0 then return refuse('re_get takes 1 key and no arguments') end
  local store, names, why = prepare(keys)
  if not store then return why end
  local f = call('HMGET', keys[1], 'd', 'del', 'ct', 'hlc', 'o', 'v', 'ts')
  if not f[4] or f[2] == '1' then return nil end
  local data = f[1] or ''
  local encoding = sub(data, 1, 4) == ZSTD_MAGIC and 'zstd' or 'raw'
  return {data, encoding, f[3] or 'binary', f[4], f[5] or '', f[6] or '0', f[7] or '0'}
end

-- re_hashes (read-only): KEYS = hashes of one partition (items, tree nodes), all in one slot.
-- Returns each key's fields and values as HGETALL gives them, {} where absent. A peer's cold
-- path reads many hashes at a time; one call instead of one command per hash halves what a
-- client spends per item. It reads nothing the caller could not read with HGETALL: Redis checks
-- each call inside a function against the caller's ACL (commands and key patterns).
local function re_hashes(keys, args)
  if #args ~= 0 then return refuse('re_hashes takes no arguments') end
  if #keys > MAX_KEYS_PER_CALL then
    return refuse('re_hashes takes at most ' .. MAX_KEYS_PER_CALL .. ' keys per call')
  end
  local out, hgetall = {}, redis.call
  for i = 1, #keys do out[i] = hgetall('HGETALL', keys[i]) end
  return out
end

local function re_version()
  return LIBRARY_VERSION
end

register('re_put', re_put, false)
register('re_put_many', re_put_many, false)
register('re_del', re_del, false)
register('re_write', re_write, false)
register('re_get', re_get, true)
register('re_hashes', re_hashes, true)
register('re_version', re_version, true)
