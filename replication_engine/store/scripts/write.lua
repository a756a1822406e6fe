-- A local write (put or delete): ARGV[4] = stream maxlen, then key, leaf path, tombstone flag,
-- data, content hash, proposed hlc, origin, content type, updated_at ms, trace parent.
-- Returns {hlc, stream id}. Fails, writing nothing, when a key it would write holds the wrong
-- type or the store's clock is at the end of the HLC range.
local key, path, tomb = ARGV[5], ARGV[6], ARGV[7]
local problem = check_store_keys({HLC_KEY, 'string', ROOT_KEY, 'string', TOMBS_KEY, 'zset',
  CDC_KEY, 'stream'})
if problem then return problem end
local cur, why = read_checked_leaf(key, path)
if not cur then return fail(P .. 'item:' .. key, why) end
-- The timestamp: the proposal from the client's clock, or the successor of the last one issued
-- when the proposal is not newer (a clock that went backwards, or two writers racing). Kept in
-- Redis so every writer process and every restart shares one clock.
local hlc = ARGV[10]
local last = call('GET', HLC_KEY)
if last and not bytes_gt(hlc, last) then
  hlc = hlc_successor(last)
  if not hlc then
    return fail(HLC_KEY, 'ERR HLC exhausted: the store clock ' .. last ..
      ' is at the end of the 48-bit millisecond range; no later timestamp exists')
  end
end
-- A peer's version counter near 2^53 must not overflow (Lua numbers are doubles).
local previous = tonumber(cur.version) or 0
if previous ~= previous or previous < 0 or previous >= MAX_VERSION then
  previous = MAX_VERSION - 1
end
local version = string.format('%d', previous + 1)
local data, hash, origin, ct, updated_at, tp = ARGV[8], ARGV[9], ARGV[11], ARGV[12], ARGV[13],
  ARGV[14]
call('SET', HLC_KEY, hlc)
why = write_item(key, path, tomb, data, hash, hlc, origin, ct, version, updated_at, tp, cur)
if why then return fail(MK .. path, why) end
local sid = emit(ARGV[4], key, tomb, data, hash, hlc, origin, ct, version, updated_at, tp)
tree_flush()
return {hlc, sid}
