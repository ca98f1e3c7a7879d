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
