"""The `cryopick` command: one subcommand per module of this package.

Every module here defines ``add_args(parser)`` and ``main(args)``; its docstring is the help text. The
dispatcher finds the modules itself, so adding a subcommand is adding a module. Module names use
underscores (``disca_predict``); the command a user types uses hyphens (``cryopick disca-predict``).
"""
import argparse
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
        print(f'cryopick {args.command}: error: {exc}', file=sys.stderr)
        # A Scipion protocol running this command reads the one-line message back (see protocol_base).
        error_file = os.environ.get('CRYOPICK_ERROR_FILE')
        if error_file:
            with open(error_file, 'w') as fh:
                fh.write(str(exc))
        return 2
    return int(result or 0)


if __name__ == '__main__':
    sys.exit(main())
