"""Write a Scipion hosts.conf that sends protocols (or each of their steps) to a SLURM cluster.

Scipion reads its execution hosts from hosts.conf ($SCIPION_HOSTS, usually <Scipion>/config/hosts.conf).
The [localhost] section written here keeps running everything on this machine by default and adds a
SLURM queue per partition: in the protocol form set "Use a queue engine?" to Yes and pick the queue, or
in a script set it with the workflow options --queue / --queue-params. Queue parameters the form asks
for (defaults from the options below):

  JOB_MEMORY      memory per job, as sbatch --mem takes it (e.g. 16G)
  JOB_TIME        time limit per job in hours
  JOB_GPUS        GPUs per job that runs a network on a GPU (--gres=gpu:N); 0: never ask for GPUs
  QUEUE_FOR_JOBS  N: the whole protocol is one job; Y: one job per step (e.g. per tomogram)
  STEP_THREADS    with one job per step: CPUs of each job; 0: the protocol's threads (Scipion's way)

Each job asks for the protocol's threads as --cpus-per-task (cryopick commands then use exactly that
many torch/BLAS threads). With one job per step the protocol's threads also set how many step jobs run
at once (threads − 1), hence STEP_THREADS: e.g. threads 65 and STEP_THREADS 2 keep 64 two-CPU jobs going.
GPUs are asked for only when a job needs them: a whole protocol that was given GPUs, or a step whose
command Scipion gave GPUs (CUDA_VISIBLE_DEVICES); with --gpu-partition such jobs go there.
The job script exports what cryopick needs on the node: this environment's Python first on PATH and the
SCIPION_* / CRYOPICK_* variables set here (a job keeps the values it brings with it). Scipion polls jobs
with squeue and cancels them with scancel.

Example:
  cryopick cluster-config --partition cpu --gpu-partition gpu --gpus-per-job 1 --time 12 --mem 32G \\
      > "$SCIPION_HOSTS"
"""
import json
import os
import shlex
import sys

from ..engine.errors import InputError

# squeue prints nothing once SLURM has forgotten a job, and its final state just before.
DONE_STATES = ('COMPLETED', 'FAILED', 'CANCELLED', 'TIMEOUT', 'OUT_OF_MEMORY', 'NODE_FAIL', 'PREEMPTED',
               'BOOT_FAIL', 'DEADLINE')
# Set per job by the protocol; the template must not pin them.
PER_JOB_VARS = ('CRYOPICK_ERROR_FILE', 'CRYOPICK_USAGE_FILE', 'CRYOPICK_THREADS')


def add_args(parser):
    parser.add_argument('--partition', required=True, action='append',
                        help='SLURM partition for the jobs; repeat for several (each becomes a queue in the form)')
    parser.add_argument('--gpu-partition', default=None,
                        help='partition for the jobs that need a GPU (default: the partition chosen in the form)')
    parser.add_argument('--gpus-per-job', type=int, default=1,
                        help='GPUs a GPU job asks for (default 1; 0: never ask for GPUs)')
    parser.add_argument('--time', type=int, default=24, help='time limit per job in hours (default 24)')
    parser.add_argument('--mem', default='16G', help='memory per job, sbatch --mem syntax (default 16G)')
    parser.add_argument('--per-step', action='store_true',
                        help='default to one job per step instead of one job per protocol')
    parser.add_argument('--step-threads', type=int, default=0,
                        help='CPUs of each job with one job per step (default 0: the protocol\'s threads)')
    parser.add_argument('--account', default=None, help='SLURM account to charge (sbatch --account)')
    parser.add_argument('--sbatch', action='append', default=[], metavar='OPTION',
                        help='extra sbatch option for every job, e.g. --sbatch=--qos=normal (repeatable)')
    parser.add_argument('--out', default=None, help='write here instead of standard output')


def hosts_conf(partitions, gpu_partition=None, gpus_per_job=1, hours=24, mem='16G', per_step=False,
               step_threads=0, account=None, sbatch_options=(), environ=None, python=None):
    """The text of a hosts.conf with a SLURM queue per partition (see the module help)."""
    environ = os.environ if environ is None else environ
    python = python or sys.executable
    partitions = list(partitions)
    for name, value in [('--partition', p) for p in partitions] + [('--gpu-partition', gpu_partition),
                                                                     ('--account', account)]:
        if value is not None and (not value or any(c.isspace() or c in '"\'%$;' for c in value)):
            raise InputError(name, f'{value!r} is not a SLURM name')
    if gpus_per_job < 0:
        raise InputError('--gpus-per-job', f'must be 0 or more, got {gpus_per_job}')
    if step_threads < 0:
        raise InputError('--step-threads', f'must be 0 or more, got {step_threads}')
    if hours < 1:
        raise InputError('--time', f'must be at least 1 hour, got {hours}')
    if not mem or any(c.isspace() for c in mem):
        raise InputError('--mem', f'{mem!r} is not an sbatch --mem value')

    params = [['JOB_MEMORY', mem, 'Memory per job', 'sbatch --mem: memory of each job (e.g. 16G, 4000M)'],
              ['JOB_TIME', str(hours), 'Time limit (hours)', 'Each job is stopped after this many hours'],
              ['JOB_GPUS', str(gpus_per_job), 'GPUs per GPU job',
               'GPUs asked for (--gres=gpu:N) by jobs that run on a GPU; jobs that need none ask for none'],
              ['QUEUE_FOR_JOBS', 'Y' if per_step else 'N', 'One job per step (Y/N)',
               'N: the whole protocol runs as one job. Y: each step (e.g. each tomogram) is a job of its own, '
               'and the protocol waits for them here'],
              ['STEP_THREADS', str(step_threads), 'CPUs per step job (0: Threads)',
               'With one job per step: CPUs of each job. 0: the protocol\'s Threads, which also set how many '
               'step jobs run at once (Threads - 1)']]
    queues = {p: params for p in partitions}
    defaults = {name: value for name, value, _, _ in params}

    gpu_options = f'--gres=gpu:%_(JOB_GPUS)s'
    if gpu_partition:
        gpu_options = f'--partition={gpu_partition} ' + gpu_options
    # sbatch options on the command line win over the script's. Scipion writes a step's GPUs into its
    # command (CUDA_VISIBLE_DEVICES=...) only for steps that need one; a whole protocol needs them when it
    # was given any (GPU_COUNT).
    step_cpus = ('$([ "%_(QUEUE_FOR_JOBS)s" = Y ] && [ %_(STEP_THREADS)s -gt 0 ] && '
                 'echo --cpus-per-task=%_(STEP_THREADS)s)')
    gpus = ('$(if [ "%_(QUEUE_FOR_JOBS)s" = Y ]; then grep -q CUDA_VISIBLE_DEVICES= %_(JOB_SCRIPT)s; '
            'else [ %_(GPU_COUNT)s -gt 0 ]; fi && [ %_(JOB_GPUS)s -gt 0 ] && echo ' + gpu_options + ')')
    submit = f'sbatch {step_cpus} {gpus} %_(JOB_SCRIPT)s'


    directives = ['--job-name=%_(JOB_NAME)s', '--partition=%_(JOB_QUEUE)s', '--output=%_(JOB_LOGS)s.out',
                  '--error=%_(JOB_LOGS)s.err', '--ntasks=%_(JOB_NODES)d', '--cpus-per-task=%_(JOB_THREADS)d',
                  '--mem=%_(JOB_MEMORY)s', '--time=%_(JOB_TIME)s:00:00', '--export=ALL']
    if account:
        directives.append(f'--account={account}')
    for option in sbatch_options:
        option = option.strip()
        if not option.startswith('-') or '\n' in option:
            raise InputError('--sbatch', f'{option!r} is not an sbatch option')
        directives.append(_template_literal(option))
    lines = ['#!/bin/bash'] + [f'#SBATCH {d}' for d in directives]
    lines.append('# what cryopick needs on the node, from where this file was written (a job keeps its own values)')
    lines.append(f'export PATH={_template_literal(shlex.quote(os.path.dirname(python)))}:"$PATH"')
    for var in sorted(environ):
        if var.startswith(('SCIPION_', 'CRYOPICK_')) and var not in PER_JOB_VARS and '\n' not in environ[var]:
            value = _template_literal(shlex.quote(environ[var]))
            lines.append(f'[ -n "${{{var}+set}}" ] || export {var}={value}')
    lines.append('echo "SLURM job $SLURM_JOB_ID on $(hostname): partition $SLURM_JOB_PARTITION, '
                 'CPUs $SLURM_CPUS_PER_TASK, GPUs ${SLURM_JOB_GPUS:-none}"')
    lines.append('%_(JOB_COMMAND)s')

    out = [
        '; Scipion execution hosts, written by `cryopick cluster-config` (README: "Running on a cluster").',
        '; Protocols run on this machine unless "Use a queue engine?" is Yes in their form (or a script sets',
        '; a queue); then they go to SLURM through the queue chosen there.',
        '[localhost]',
        'PARALLEL_COMMAND = mpirun -np %_(JOB_NODES)d --map-by node %_(COMMAND)s',
        'NAME = SLURM',
        'MANDATORY = 0',
        'SUBMIT_PREFIX = cryopick',
        f'SUBMIT_COMMAND = {submit}',
        'CHECK_COMMAND = squeue -h -j %_(JOB_ID)s -o %%T',
        'CANCEL_COMMAND = scancel %_(JOB_ID)s',
        'JOB_DONE_REGEX = ' + '|'.join(DONE_STATES),
        'QUEUES = ' + json.dumps(queues),
        'QUEUES_DEFAULT = ' + json.dumps(defaults),
        'SUBMIT_TEMPLATE = ' + lines[0],
    ]
    out += ['        ' + line for line in lines[1:]]
    return '\n'.join(out) + '\n'


def _template_literal(text):
    """Text that passes Scipion's %-formatting of the template unchanged."""
    return text.replace('%', '%%')


def main(args):
    text = hosts_conf(args.partition, gpu_partition=args.gpu_partition, gpus_per_job=args.gpus_per_job,
                      hours=args.time, mem=args.mem, per_step=args.per_step, step_threads=args.step_threads,
                      account=args.account,
                      sbatch_options=args.sbatch)
    if args.out:
        tmp = args.out + '.tmp'
        with open(tmp, 'w') as fh:
            fh.write(text)
        os.replace(tmp, args.out)
    else:
        sys.stdout.write(text)
    return 0
