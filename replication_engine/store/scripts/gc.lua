-- Collect tombstones older than the horizon. ARGV[3] = horizon ms, then key, leaf path pairs
-- (chosen by the caller from the tombstone index; re-checked here because a newer write may have
-- replaced the tombstone since). Returns the number collected.
local horizon = tonumber(ARGV[3])
local n = 0
for i = 4, #ARGV, 2 do
  local key, path = ARGV[i], ARGV[i + 1]
  local cur = read_item(key)
  local expired = cur.del == '1' and hlc_ms(cur.hlc) < horizon
  if expired then
    redis.call('DEL', P .. 'item:' .. key)
    tree_set(path, key, false, current_digest(key, cur))
    n = n + 1
  end
  if expired or cur.del ~= '1' then
    redis.call('ZREM', TOMBS_KEY, key)
  end
end
tree_flush()
return n
