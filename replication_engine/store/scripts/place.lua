-- Place items in the tree by their keys: the last step of converting a format-1 store
-- (replication-engine migrate), whose items are already under the partition's names but whose
-- tree was laid out by another bucket hash. ARGV[4..] = application keys. Each item's leaf
-- digest is its 'g' field (computed and stored when absent); the leaf is set and the change
-- queued for every ancestor, as a write does. The caller starts from an empty tree, so nothing
-- is replaced. Returns {placed, skipped}: skipped keys hold no readable version.
local problem = check_store_keys({ROOT_KEY, 'string'})
if problem then return problem end
local placed, skipped = 0, 0
for i = 4, #ARGV do
  local key = ARGV[i]
  local f = pcall_('HMGET', ITEM .. key, 'hlc', 'h', 'del', 'g')
  if f.err or not f[1] then
    skipped = skipped + 1
  else
    local digest = f[4]
    if not digest then
      digest = leaf_digest(key, f[1], f[2] or '', f[3] or '0')
      call('HSET', ITEM .. key, 'g', digest)
    end
    local path = path_of(key)
    local refused = ancestors_problem(path) or tree_set(path, key, digest, false)
    if refused then skipped = skipped + 1 else placed = placed + 1 end
  end
end
tree_flush()
return {placed, skipped}
