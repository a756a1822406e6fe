-- Discard versions without writing a tombstone or a CDC entry: a re-bootstrap removing what this
-- node kept from before it left the mesh and no peer in the mesh holds any more (their deletes
-- were collected after the tombstone grace). Only this store changes; nothing replicates.
-- ARGV[3] onwards: key, leaf path, hlc (16 hex), origin, per item. A key whose version changed
-- since the caller chose it (a newer local write or apply) is left alone.
-- Returns how many were discarded.
local n = 0
for i = 3, #ARGV, 4 do
  local key, path, hlc, origin = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local cur = read_item(key)
  if cur.hlc == hlc and cur.origin == origin then
    redis.call('DEL', P .. 'item:' .. key)
    tree_set(path, key, false, current_digest(key, cur))
    if cur.del == '1' then redis.call('ZREM', TOMBS_KEY, key) end
    n = n + 1
  end
end
tree_flush()
return n
