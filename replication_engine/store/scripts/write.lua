-- A local write (put or delete): ARGV[3] = stream maxlen, then
-- key, leaf path, tombstone flag, data, content hash, proposed hlc, origin, content type,
-- updated_at ms, trace parent. Returns {hlc, stream id}.
local key, path, tomb = ARGV[4], ARGV[5], ARGV[6]
local cur = read_item(key)
local version = string.format('%d', (tonumber(cur.version) or 0) + 1)
local hlc = hlc_issue(ARGV[9])
local sid = write_item(ARGV[3], key, path, tomb, ARGV[7], ARGV[8], hlc, ARGV[10], ARGV[11],
  version, ARGV[12], ARGV[13], cur)
tree_flush()
return {hlc, sid}
