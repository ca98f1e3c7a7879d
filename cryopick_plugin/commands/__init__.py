"""The `cryopick` command: one subcommand per module of this package.

Every module here defines ``add_args(parser)`` and ``main(args)``; its docstring is the help text. The
dispatcher finds the modules itself, so adding a subcommand is adding a module. Module names use
underscores (``disca_predict``); the command a user types uses hyphens (``cryopick disca-predict``).
"""
import argparse
import errno
import importlib
import logging
import os
import pkgutil
import sys

from ..engine.errors import InputError


def command_modules():
    """Sorted (command name, module) pairs of every subcommand module."""
    found = []
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith('_'):
            continue
        module = importlib.import_module(f'{__name__}.{info.name}')
        if hasattr(module, 'add_args') and hasattr(module, 'main'):
            found.append((info.name.replace('_', '-'), module))
    return sorted(found, key=lambda pair: pair[0])


def build_parser():
    parser = argparse.ArgumentParser(
        prog='cryopick',
        description='cryopick: DeepETPicker, DISCA, DeepCryoPicker and CryoSegNet for cryo-EM/ET, '
                    'each stage runnable on its own.')
    parser.add_argument('-v', '--verbose', action='store_true', help='log debugging detail')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND')
    sub.required = True
    for name, module in command_modules():
        doc = (module.__doc__ or '').strip()
        summary = doc.splitlines()[0] if doc else ''
        p = sub.add_parser(name, help=summary, description=doc,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_args(p)
        p.set_defaults(func=module.main)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format='%(asctime)s %(name)s %(levelname)s: %(message)s', stream=sys.stderr)
    try:
        if getattr(args, 'threads', None) is not None:
            apply_threads(args.threads)
        result = args.func(args)
    except InputError as exc:
        return _fail(args.command, str(exc))
    except OSError as exc:
        if exc.errno not in _NO_SPACE:
            raise
        # Outputs are written atomically, so nothing half-written is left: say so in one line.
        where = exc.filename or getattr(args, 'out', None) or 'output'
        return _fail(args.command, f'{where}: cannot write ({os.strerror(exc.errno)}); nothing was written, '
                                   f'free some space and run again')
    return int(result or 0)


class DefaultsHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Help that ends every option's text with its default, unless the text already says it.

    A command opts in with ``parser.formatter_class = DefaultsHelpFormatter`` in its add_args. Options whose
    default is None must say in words what happens then (the test of train3d checks that they do).
    """

    def _get_help_string(self, action):
        text = action.help or ''
        if (not action.option_strings or action.nargs == 0 or action.default in (None, argparse.SUPPRESS)
                or 'default' in text.lower()):
            return text
        return text + ' (default: %(default)s)'


def add_resume_args(parser, what='OUT.checkpoint.pt (written after every epoch)'):
    """--resume / --no-resume of the trainings that checkpoint every epoch (dest 'resume': True, False or
    'auto' — continue a checkpoint of a run with the same settings, replace any other)."""
    resume = parser.add_mutually_exclusive_group()
    resume.add_argument('--resume', dest='resume', action='store_const', const=True, default='auto',
                        help=f'continue the run saved in {what} and fail when there is none; without --resume / '
                             '--no-resume a checkpoint of a run with the same settings is continued, any other '
                             'is replaced')
    resume.add_argument('--no-resume', dest='resume', action='store_const', const=False,
                        help='start afresh even when a checkpoint holds an interrupted run')


def add_threads_arg(parser):
    """The --threads option of every command that computes (networks, filters, clustering)."""
    parser.add_argument('--threads', type=int, default=None, metavar='N',
                        help='CPU threads for torch, BLAS and OpenCV (default: what torch chooses, usually '
                             'one per core; set it when sharing a machine or a queue slot)')


def apply_threads(n, what='--threads'):
    """Limit torch, the BLAS libraries numpy/scipy loaded (threadpoolctl) and OpenCV to `n` threads.

    The environment variables are set too, for libraries loaded later and for child processes; the
    libraries already loaded ignore them, hence the explicit calls.
    """
    if n is None:
        return None
    n = int(n)
    if n < 1:
        raise InputError(what, f"must be at least 1, got {n}")
    for var in ('OMP_NUM_THREADS', 'MKL_NUM_THREADS', 'OPENBLAS_NUM_THREADS'):
        os.environ[var] = str(n)
    import torch
    torch.set_num_threads(n)
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(n)
    except ImportError:
        pass
    try:
        import cv2
        cv2.setNumThreads(n)
    except ImportError:
        pass
    return n


# Disk full, file-size limit reached, quota exceeded.
_NO_SPACE = {errno.ENOSPC, errno.EFBIG, getattr(errno, 'EDQUOT', errno.ENOSPC)}


def _fail(command, message):
    print(f'cryopick {command}: error: {message}', file=sys.stderr)
    # A Scipion protocol running this command reads the one-line message back (see protocol_base).
    error_file = os.environ.get('CRYOPICK_ERROR_FILE')
    if error_file:
        with open(error_file, 'w') as fh:
            fh.write(message)
    return 2


if __name__ == '__main__':
    sys.exit(main())
