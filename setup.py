"""scipion-em-cryopick: DeepETPicker, DISCA, DeepCryoPicker and CryoSegNet as Scipion protocols."""
import os
import re

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def read_version():
    with open(os.path.join(HERE, 'cryopick_plugin', 'constants.py')) as fh:
        return re.search(r"__version__ = '([^']+)'", fh.read()).group(1)


def read_requirements(name):
    with open(os.path.join(HERE, name)) as fh:
        return [line.strip() for line in fh if line.strip() and not line.startswith('#')]


setup(
    name='scipion-em-cryopick',
    version=read_version(),
    description='Scipion plugin: 3D picking (DeepETPicker), subtomogram clustering (DISCA) and 2D picking '
                '(DeepCryoPicker, CryoSegNet) for cryo-EM and cryo-ET',
    long_description=open(os.path.join(HERE, 'README.md')).read(),
    long_description_content_type='text/markdown',
    license='GPLv3',
    python_requires='>=3.11,<3.12',
    packages=find_packages(include=['cryopick_plugin', 'cryopick_plugin.*']),
    package_data={'cryopick_plugin': ['protocols.conf', '*.png']},
    include_package_data=True,
    install_requires=read_requirements('requirements.txt'),
    extras_require={'test': read_requirements('requirements-test.txt')},
    entry_points={
        'pyworkflow.plugin': ['cryopick_plugin = cryopick_plugin'],
        'console_scripts': ['cryopick = cryopick_plugin.commands:main'],
    },
    classifiers=['Programming Language :: Python :: 3.11',
                 'Topic :: Scientific/Engineering :: Bio-Informatics'],
)
