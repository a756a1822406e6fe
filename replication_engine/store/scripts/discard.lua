-- Drop versions that a peer's claims prove dead (docs/DELETES.md, "Absence by knowledge"),
-- from this store only: no tombstone and no CDC entry are written. ARGV[4] and ARGV[5] = this
-- store's incarnation and certification count when the repair began, then key, hlc (16 hex),
-- origin per item. A key whose version changed since the caller chose it (a newer
-- local write or apply) is left alone. Returns how many were dropped, or -1 (nothing done)
-- when this store's record went back meanwhile.
local problem = check_store_keys({ROOT_KEY, 'string', TOMBS_KEY, 'zset', REC, 'hash'})
if problem then return problem end
if not record_unmoved(ARGV[4], ARGV[5]) then return -1 end
local n = 0
for i = 6, #ARGV, 3 do
  local key, hlc, origin = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local path = path_of(key)
  local cur = read_checked_leaf(key, path)
  if cur and cur.hlc == hlc and cur.origin == origin then
    remove_item(key, path, cur)
    n = n + 1
  end
end
tree_flush()
return n
