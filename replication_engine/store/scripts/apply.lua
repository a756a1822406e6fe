-- The one apply path for remote versions (hot path and cold path alike).
-- ARGV[3] = stream maxlen, ARGV[4] = tombstone horizon (ms; older tombstones for keys we do not
-- hold are already collected here and must not come back), then 11 fields per item:
-- key, leaf path, tombstone flag, data, content hash, hlc, origin, content type, version,
-- updated_at, trace parent.
-- Returns one status per item: 'a' applied, 'd' duplicate (same content, not newer),
-- 's' stale (older than what we hold), 'x' expired tombstone.
local maxlen, horizon = ARGV[3], tonumber(ARGV[4])
local out = {}
local newest = false
for i = 5, #ARGV, 11 do
  local key, path, tomb, data, hash = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  local hlc, origin = ARGV[i + 5], ARGV[i + 6]
  local cur = read_item(key)
  local status = 'a'
  if cur.hlc then
    local newer = bytes_gt(hlc, cur.hlc) or (hlc == cur.hlc and bytes_gt(origin, cur.origin or ''))
    if not newer then
      if cur.hash == hash and cur.del == tomb then status = 'd' else status = 's' end
    end
  elseif tomb == '1' and hlc_ms(hlc) < horizon then
    status = 'x'
  end
  if status == 'a' then
    if not newest or bytes_gt(hlc, newest) then newest = hlc end
    write_item(maxlen, key, path, tomb, data, hash, hlc, origin, ARGV[i + 7], ARGV[i + 8],
      ARGV[i + 9], ARGV[i + 10], cur)
  end
  out[#out + 1] = status
end
tree_flush()
if newest then hlc_observe(newest) end
return out
