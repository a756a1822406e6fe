-- Open (or create) this store's record for an engine: ARGV[4] = mode, ARGV[5] = relay ('1' or
-- '0'), ARGV[6] = a new incarnation, ARGV[7] = a new epoch.
-- A store without a record is new, or its Redis was wiped: it gets a new incarnation, whose
-- first epoch is its genesis (a reader from the start of its stream may take its claims while
-- it lasts), and the engine decides whether it recovers (docs/DELETES.md). A change of relay setting starts a new epoch, since
-- what a reader may claim from this stream depends on it. Fails when the record belongs to
-- another node. Returns {'created' | 'opened', incarnation, epoch}.
local problem = check_store_keys({REC, 'hash'})
if problem then return problem end
local mode, relay = ARGV[4], ARGV[5]
local f = call('HMGET', REC, 'inc', 'id', 'relay', 'epoch')
if f[2] and f[2] ~= SELF then
  return fail(REC, 'ERR this store belongs to node ' .. f[2] .. ', not ' .. SELF)
end
if not f[1] then
  -- Created on this Redis process: the engine decides (new store, or one that lost writes)
  -- before its first certification, which then finds the process unchanged.
  local run = string.match(call('INFO', 'server'), 'run_id:(%x+)') or ''
  call('HSET', REC, 'id', SELF, 'mode', mode, 'relay', relay, 'inc', ARGV[6], 'epoch', ARGV[7],
    'genesis', ARGV[7], 'cert', 0, 'run', run, 'state', 'recovering',
    'reason', 'new or wiped store: no record')
  return {'created', ARGV[6], ARGV[7]}
end
local epoch = f[4]
if f[3] ~= relay then
  epoch = ARGV[7]
  call('HSET', REC, 'relay', relay, 'epoch', epoch)
end
call('HSET', REC, 'id', SELF, 'mode', mode)
return {'opened', f[1], epoch}
