-- Shared by every script: key layout, HLC arithmetic and the incremental Merkle update.
-- ARGV[1] = key prefix, ARGV[2] = hex characters per tree level. See docs/FORMAT.md.
--
-- HLCs are 16-hex strings and digests 32-hex strings. Strings are compared byte by byte here,
-- never with Lua's < (which uses strcoll and so depends on the server's locale).
local P = ARGV[1]
local W = tonumber(ARGV[2])
local HLC_KEY = P .. 'hlc'
local ROOT_KEY = P .. 'mk:root'
local TOMBS_KEY = P .. 'tombs'
local CDC_KEY = P .. 'cdc'

local function bytes_gt(a, b)
  local la, lb = #a, #b
  local n = la < lb and la or lb
  for i = 1, n do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x > y end
  end
  return la > lb
end

-- A 128-bit digest is handled as four 32-bit words inside a script and as 32 hex characters
-- in Redis; converting only at the edges keeps per-item work to a few bit operations.
local function words(hex)
  return {tonumber(string.sub(hex, 1, 8), 16), tonumber(string.sub(hex, 9, 16), 16),
          tonumber(string.sub(hex, 17, 24), 16), tonumber(string.sub(hex, 25, 32), 16)}
end

local function hex_of(w)
  return bit.tohex(w[1], 8) .. bit.tohex(w[2], 8) .. bit.tohex(w[3], 8) .. bit.tohex(w[4], 8)
end

local function xor_into(acc, w)
  acc[1], acc[2] = bit.bxor(acc[1], w[1]), bit.bxor(acc[2], w[2])
  acc[3], acc[4] = bit.bxor(acc[3], w[3]), bit.bxor(acc[4], w[4])
end

local function is_zero(w)
  return w[1] == 0 and w[2] == 0 and w[3] == 0 and w[4] == 0
end

local function leaf_digest(key, hlc, hash, tomb)
  local text = #key .. ':' .. key .. '|' .. hlc .. '|' .. tomb .. '|' .. hash
  return string.sub(redis.sha1hex(text), 1, 32)
end

local function hlc_ms(hlc)
  return tonumber(string.sub(hlc, 1, 12), 16)
end

local function hlc_successor(hlc)
  local ms, counter = hlc_ms(hlc), tonumber(string.sub(hlc, 13, 16), 16)
  if counter >= 65535 then
    ms, counter = ms + 1, 0
  else
    counter = counter + 1
  end
  return string.format('%012x%04x', ms, counter)
end

-- Advance the store clock past a timestamp applied from elsewhere.
local function hlc_observe(hlc)
  local last = redis.call('GET', HLC_KEY)
  if not last or bytes_gt(hlc, last) then
    redis.call('SET', HLC_KEY, hlc)
  end
end

-- The timestamp for a local write: the proposal from the client's clock, or the successor of
-- the last one issued when the proposal is not newer (a clock that went backwards, or two
-- writers racing). Kept in Redis so every writer process and every restart shares one clock.
local function hlc_issue(proposed)
  local last = redis.call('GET', HLC_KEY)
  local hlc = proposed
  if last and not bytes_gt(proposed, last) then
    hlc = hlc_successor(last)
  end
  redis.call('SET', HLC_KEY, hlc)
  return hlc
end

-- Ancestor updates are accumulated per script call and written once by tree_flush(): a batch
-- of 1,000 items touches the root and the upper levels once, not 1,000 times. XOR commutes, so
-- the result is the same as updating them item by item.
local PENDING = {}
local PENDING_ORDER = {}
local ROOT_DELTA = {0, 0, 0, 0}

-- Set (new_digest) or clear (false) one key's leaf and queue the change for every ancestor.
-- old_digest is the key's current leaf digest (false if none): callers derive it from the item
-- they already read, which the atomic write path guarantees matches the leaf.
local function tree_set(path, key, new_digest, old)
  local leaf = P .. 'mk:' .. path
  local delta = {0, 0, 0, 0}
  if new_digest then
    redis.call('HSET', leaf, key, new_digest)
    xor_into(delta, words(new_digest))
  else
    redis.call('HDEL', leaf, key)
  end
  if old then xor_into(delta, words(old)) end
  if is_zero(delta) then return end
  for level_end = #path - W, 0, -W do
    local parent = P .. 'mk:' .. string.sub(path, 1, level_end)
    local child = string.sub(path, level_end + 1, level_end + W)
    local node = PENDING[parent]
    if not node then
      node = {}
      PENDING[parent] = node
      PENDING_ORDER[#PENDING_ORDER + 1] = parent
    end
    local acc = node[child]
    if not acc then
      acc = {0, 0, 0, 0}
      node[child] = acc
    end
    xor_into(acc, delta)
  end
  xor_into(ROOT_DELTA, delta)
end

-- Apply a queued delta to a stored digest (hash field or string), deleting it at zero.
local function store_xor(current, delta)
  local value = {0, 0, 0, 0}
  if current then value = words(current) end
  xor_into(value, delta)
  if is_zero(value) then return false end
  return hex_of(value)
end

-- Write the queued ancestor changes. Every script that calls tree_set ends with this.
local function tree_flush()
  for _, parent in ipairs(PENDING_ORDER) do
    for child, delta in pairs(PENDING[parent]) do
      if not is_zero(delta) then
        local value = store_xor(redis.call('HGET', parent, child), delta)
        if value then
          redis.call('HSET', parent, child, value)
        else
          redis.call('HDEL', parent, child)
        end
      end
    end
  end
  if not is_zero(ROOT_DELTA) then
    local root = store_xor(redis.call('GET', ROOT_KEY), ROOT_DELTA)
    if root then
      redis.call('SET', ROOT_KEY, root)
    else
      redis.call('DEL', ROOT_KEY)
    end
  end
end

-- The current version of a key, as the fields write_item and the apply rule need.
local function read_item(key)
  local f = redis.call('HMGET', P .. 'item:' .. key, 'hlc', 'o', 'h', 'del', 'v', 'tp', 'g')
  return {hlc = f[1], origin = f[2], hash = f[3] or '', del = f[4], version = f[5], tp = f[6],
          digest = f[7]}
end

local function current_digest(key, cur)
  if not cur.hlc then return false end
  return cur.digest or leaf_digest(key, cur.hlc, cur.hash, cur.del)
end

-- Write one item version over cur (from read_item): the item hash, its tree leaf, the
-- tombstone index and the CDC entry.
local function write_item(maxlen, key, path, tomb, data, hash, hlc, origin, ct, version, updated_at,
                          tp, cur)
  local item = P .. 'item:' .. key
  local digest = leaf_digest(key, hlc, hash, tomb)
  local fields = {'HSET', item, 'hlc', hlc, 'o', origin, 'del', tomb, 'v', version,
                  'ts', updated_at, 'g', digest}
  local stale = {'HDEL', item}
  if tomb == '1' then
    if cur.hlc and cur.del ~= '1' then
      stale[#stale + 1], stale[#stale + 2], stale[#stale + 3] = 'd', 'h', 'ct'
    end
    redis.call('ZADD', TOMBS_KEY, hlc_ms(hlc), key)
  else
    fields[#fields + 1], fields[#fields + 2] = 'd', data
    fields[#fields + 1], fields[#fields + 2] = 'h', hash
    fields[#fields + 1], fields[#fields + 2] = 'ct', ct
    if cur.del == '1' then redis.call('ZREM', TOMBS_KEY, key) end
  end
  if tp ~= '' then
    fields[#fields + 1], fields[#fields + 2] = 'tp', tp
  elseif cur.tp then
    stale[#stale + 1] = 'tp'
  end
  if #stale > 2 then redis.call(unpack(stale)) end
  redis.call(unpack(fields))
  tree_set(path, key, digest, current_digest(key, cur))
  -- meta is assembled from the decimal strings the caller validated, not Lua numbers: cjson
  -- prints numbers with 14 significant digits, which would corrupt large values.
  local meta = '{"version":' .. version .. ',"updated_at":' .. updated_at .. ',"hlc":"' .. hlc ..
    '","origin":' .. cjson.encode(origin)
  if tp ~= '' then meta = meta .. ',"trace_parent":' .. cjson.encode(tp) end
  if tomb == '1' then
    return redis.call('XADD', CDC_KEY, 'MAXLEN', '~', maxlen, '*',
      'op', 'DEL', 'key', key, 'meta', meta .. '}')
  end
  meta = meta .. ',"content_type":' .. cjson.encode(ct) .. '}'
  return redis.call('XADD', CDC_KEY, 'MAXLEN', '~', maxlen, '*',
    'op', 'PUT', 'key', key, 'hash', hash, 'data', data, 'meta', meta)
end
