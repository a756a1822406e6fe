-- A local write (put or delete): ARGV[3] = stream maxlen, then
-- key, leaf path, tombstone flag, data, content hash, proposed hlc, origin, content type,
-- updated_at ms, trace parent. Returns {hlc, stream id}.
local key, path, tomb = ARGV[4], ARGV[5], ARGV[6]
local cur = read_item(key)
local version = string.format('%d', (tonumber(cur.version) or 0) + 1)
local hlc = hlc_issue(ARGV[9])
local data, hash, origin, ct, updated_at, tp = ARGV[7], ARGV[8], ARGV[10], ARGV[11], ARGV[12],
  ARGV[13]
write_item(key, path, tomb, data, hash, hlc, origin, ct, version, updated_at, tp, cur)
local sid = emit(ARGV[3], key, tomb, data, hash, hlc, origin, ct, version, updated_at, tp)
tree_flush()
return {hlc, sid}
