-- Collect tombstones at or below the mesh's stable frontier (docs/DELETES.md, "Collection").
-- ARGV[4] = the stable frontier S (16 hex), ARGV[5] and ARGV[6] = this store's incarnation and
-- certification count when S was computed, then the keys chosen by the caller from the
-- tombstone index (re-checked here: a newer write may have replaced a tombstone since).
-- Records S as the collected horizon first. Returns the number collected, or -1 (nothing done)
-- when this store's record went back meanwhile (a restore or a wipe).
local stable = ARGV[4]
local problem = check_store_keys({ROOT_KEY, 'string', TOMBS_KEY, 'zset', REC, 'hash'})
if problem then return problem end
if not record_unmoved(ARGV[5], ARGV[6]) then return -1 end
local collected = call('HGET', REC, 'collected')
if not collected or hlc_gt(stable, collected) then call('HSET', REC, 'collected', stable) end
local n = 0
for i = 7, #ARGV do
  local key = ARGV[i]
  local path = path_of(key)
  local cur = read_checked_leaf(key, path)
  if cur then
    local expired = cur.del == '1' and not hlc_gt(cur.hlc, stable)
    if expired then
      remove_item(key, path, cur)
      n = n + 1
    elseif cur.del ~= '1' then
      call('ZREM', TOMBS_KEY, key)
    end
  end
end
tree_flush()
return n
