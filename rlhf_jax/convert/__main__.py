"""python -m rlhf_jax.convert --from=hf DIR --workdir=RUN [--param_dtype=float32|bfloat16]
       [--mesh.data=N --mesh.fsdp=N --mesh.tensor=N]
       [--coordinator=HOST:PORT --num_processes=N --process_id=I | --distributed=auto]
   python -m rlhf_jax.convert --to=hf DIR --workdir=RUN [--step=N] [--max_shard_mb=N] [--merge]

--from=hf reads the local Hugging Face folder DIR (config.json, *.safetensors, tokenizer)
into a fresh run directory RUN that any stage names in init.run (hf_import.py). --to=hf
writes RUN's newest checkpoint (or --step) to the fresh folder DIR (hf_export.py); a LoRA
run needs --merge (its base with the adapters merged in, docs/lora.md). Nothing
is downloaded. Bad input: one `error: ...` line, exit status 2.

An import may run as several processes (one per host, the same command in each plus the
coordinator flags of rlhf_jax/distributed.py): every process builds the same mesh and
reads only the blocks of each tensor its own devices hold. An export runs in one process.
"""
import argparse
import sys

from rlhf_jax.errors import UserError


class _Parser(argparse.ArgumentParser):
  def error(self, message):
    raise UserError(message)


def parse(argv):
  p = _Parser(prog='python -m rlhf_jax.convert', add_help=True)
  p.add_argument('folder', help='the Hugging Face folder (read with --from, written with --to)')
  p.add_argument('--from', dest='source', choices=('hf',))
  p.add_argument('--to', dest='target', choices=('hf',))
  p.add_argument('--workdir', required=True, help='our run directory')
  p.add_argument('--param_dtype', default='float32', choices=('float32', 'bfloat16'))
  p.add_argument('--step', type=int, default=-1)
  p.add_argument('--max_shard_mb', type=int, default=5 * 1024)
  for axis, default in (('data', 1), ('fsdp', -1), ('tensor', 1)):
    p.add_argument(f'--mesh.{axis}', dest=f'mesh_{axis}', type=int, default=default,
                   help=f'import: mesh.{axis} (default {default}; -1: the devices left)')
  p.add_argument('--distributed', default='', help="'auto': jax.distributed from the "
                 "cluster's environment")
  p.add_argument('--coordinator', default='', help='HOST:PORT of process 0')
  p.add_argument('--num_processes', type=int, default=0)
  p.add_argument('--process_id', type=int, default=-1)
  p.add_argument('--merge', action='store_true',
                 help='--to=hf of a LoRA run: export W + alpha/r A B (required for one)')
  args = p.parse_args(argv)
  if (args.source is None) == (args.target is None):
    raise UserError('give exactly one of --from=hf (import) and --to=hf (export)')
  if args.max_shard_mb <= 0:
    raise UserError(f'--max_shard_mb={args.max_shard_mb} must be positive')
  return args


def main(argv) -> int:
  try:
    args = parse(argv)
    from rlhf_jax import distributed
    distributed.initialize(mode=args.distributed, coordinator=args.coordinator,
                           num_processes=args.num_processes, process_id=args.process_id)
    if args.source:
      from rlhf_jax.convert import hf_import
      mesh = hf_import.import_mesh_block()
      mesh.update(data=args.mesh_data, fsdp=args.mesh_fsdp, tensor=args.mesh_tensor)
      out = hf_import.import_folder(args.folder, args.workdir, param_dtype=args.param_dtype,
                                    mesh_config=mesh)
      if distributed.is_primary():
        print(f'imported {out["family"]}: {out["tensors"]} tensors, {out["params"]:,} '
              f'parameters -> {args.workdir}; bytes read by process: '
              f'{", ".join(f"{b:,}" for b in out["bytes_read"])} of '
              f'{out["bytes_in_files"]:,} in the files')
    else:
      from rlhf_jax.convert import hf_export
      out = hf_export.export_run(args.workdir, args.folder, step=args.step,
                                 max_shard_bytes=args.max_shard_mb << 20, merge=args.merge)
      print(f'exported step {out["step"]} as {out["family"]}: {out["tensors"]} tensors in '
            f'{out["files"]} file(s) -> {args.folder}')
  except UserError as e:
    print(f'error: {" ".join(str(e).split())}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
