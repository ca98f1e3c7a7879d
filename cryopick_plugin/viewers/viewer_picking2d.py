"""Viewer of the 2D pickers (DeepCryoPicker, CryoSegNet): micrographs with picks, probability maps,
preprocessing stages and score histograms.

Reads the engine's files in extra/picks/: <micrograph stem>_picks.star (x = column, y = row, score,
diameter for CryoSegNet) and, for CryoSegNet, <stem>_prob.mrc (the U-Net probability map). The
preprocessing stages are recomputed for the first micrograph with the chain the method uses
(`engine.preprocess2d.run_chain(..., keep_stages=True)`) at the scale the method runs it: DeepCryoPicker's
working scale, CryoSegNet's full resolution (about 11 s for a 4096² micrograph on one CPU core; cached).
"""
import hashlib
import json
import os

import pandas as pd

from .. import convert
from ..engine.io import star
from ..engine.errors import InputError
from ..protocols import CryopickCryoSegNet, CryopickDeepCryoPicker
from . import figures as fig
from .viewer_base import MAX_ITEMS, CryopickFigureViewer, cached, safe_name

STAGES_SIDE = 1024  # longest side of the images the preprocessing figure is computed on


def read_picks2d(path):
    """A 2D pick table from an engine STAR file; an empty table when the file is missing or has no rows."""
    if not os.path.exists(path):
        return pd.DataFrame(columns=[star.X, star.Y, star.SCORE])
    blocks = star.read_star_blocks(path)
    table = next((b for b in blocks.values() if isinstance(b, pd.DataFrame)), None)
    if table is None or len(table) == 0 or star.X not in table.columns:
        return pd.DataFrame(columns=[star.X, star.Y, star.SCORE])
    return star.read_coordinates(path, dims=2)


def stages_figure(micrograph, out, chain, bin_factor=None, polarity='dark', switches=None):
    """Run a preprocessing chain with its stages kept on one micrograph and draw them side by side."""
    from ..engine.pick2d import preprocess as preprocess2d
    from ..engine.pick2d.micrograph_io import read_micrograph
    image, _ = read_micrograph(micrograph)
    if bin_factor is None:
        bin_factor = max(1.0, max(image.shape) / float(STAGES_SIDE))
    if chain == 'deepcryopicker' and polarity == 'dark':
        image = -image  # the method makes particles bright before its chain
    _, stages = preprocess2d.run_chain(image, chain, keep_stages=True, bin_factor=bin_factor, **(switches or {}))
    name = os.path.basename(os.fspath(micrograph))
    return fig.preprocessing_stages(stages, out, title=f'{chain} preprocessing of {name} (binned {bin_factor:g}×)')


def picking2d_figures(micrographs, picks_dir, folder, radius=None, chain='cryosegnet', chain_options=None,
                      max_micrographs=MAX_ITEMS, default_radius=10.0):
    """Figures of a 2D picking run.

    micrographs: {name: micrograph file}; picks_dir: the folder of <stem>_picks.star (and <stem>_prob.mrc);
    radius: pick radius in pixels (None: rlnDiameter / 2 of each pick, `default_radius` for tables
    without that column); chain / chain_options: the
    preprocessing shown ({'bin_factor', 'polarity', 'switches'}). Per micrograph (first `max_micrographs`):
    picks on the micrograph, then the probability map when there is one; then the preprocessing stages of
    the first micrograph and the score histogram of all picks. Returns PNG paths.
    """
    paths, tables = [], []
    names = sorted(micrographs)
    for i, name in enumerate(names):
        mic_file = os.path.abspath(micrographs[name])
        stem = os.path.splitext(os.path.basename(mic_file))[0]
        picks_file = os.path.join(picks_dir, f'{stem}_picks.star')
        picks = read_picks2d(picks_file)
        tables.append(picks)
        if i >= max_micrographs:
            continue
        r = radius if radius is not None else (None if star.DIAMETER in picks.columns else default_radius)
        paths.append(cached(folder, f'picks_{safe_name(stem)}.png', [mic_file, picks_file],
                            lambda out, m=mic_file, p=picks, n=name, r=r: fig.micrograph_picks(
                                m, p, out, radius=r, title=f'{n}: {len(p)} picks')))
        prob_file = os.path.join(picks_dir, f'{stem}_prob.mrc')
        if os.path.exists(prob_file):
            paths.append(cached(folder, f'probability_{safe_name(stem)}.png', [prob_file, picks_file],
                                lambda out, f=prob_file, p=picks, n=name, r=r: fig.probability_map(
                                    f, out, p, radius=r, title=f'{n}: U-Net probability')))
    if names:
        first = os.path.abspath(micrographs[names[0]])
        options = dict(chain_options or {})
        key = json.dumps(options, sort_keys=True, default=str)
        # The options go into the name so that another chain setting never reuses a stale figure.
        tag = f'{chain}_{hashlib.md5(key.encode()).hexdigest()[:8]}'
        paths.append(cached(folder, f'preprocessing_{tag}.png', [first],
                            lambda out: stages_figure(first, out, chain, **options)))
    scores = pd.concat([t for t in tables if len(t)], ignore_index=True) if any(len(t) for t in tables) \
        else pd.DataFrame(columns=[star.SCORE])
    sources = [os.path.join(picks_dir, f) for f in sorted(os.listdir(picks_dir))] if os.path.isdir(picks_dir) else []
    paths.append(cached(folder, 'score_histogram.png', sources,
                        lambda out: fig.score_histograms(scores, out, title=f'Scores of {len(scores)} picks on '
                                                                             f'{len(names)} micrographs')))
    return paths


class CryopickPicking2DViewer(CryopickFigureViewer):
    """Micrographs with picks coloured by score, probability maps, preprocessing stages, score histograms."""
    _label = 'cryopick: micrographs with picks'
    _targets = [CryopickDeepCryoPicker, CryopickCryoSegNet]

    def _chain(self, obj):
        """(chain name, options) of the preprocessing the protocol's method applies."""
        if isinstance(obj, CryopickDeepCryoPicker):
            options = {'polarity': ['dark', 'bright'][obj.polarity.get() or 0]}
            meta = self._modelMeta(obj)
            if meta.get('particle_px') and obj._diameterPx():
                from ..engine.pick2d.deepcryopicker.picker import working_scale
                options['bin_factor'] = 1.0 / working_scale(obj._diameterPx(), meta['particle_px'])
            return 'deepcryopicker', options
        # CryoSegNet denoises the full-resolution micrograph before scaling it to the network's input: its
        # filter sizes are in full-resolution pixels, so the stages are computed there too.
        switches = self._modelMeta(obj).get('preprocess')
        options = {'bin_factor': 1.0}
        if isinstance(switches, dict):
            options['switches'] = switches
        return 'cryosegnet', options

    @staticmethod
    def _modelMeta(obj):
        model = obj.inputModel.get() if hasattr(obj, 'inputModel') else None
        path = model.getPath() if model is not None else None
        if not path and hasattr(obj, '_modelPath'):
            path = obj._modelPath()
        if path and os.path.exists(path + '.json'):
            with open(path + '.json') as fh:
                return json.load(fh).get('meta', {})
        return {}

    def figures(self, obj):
        mics = obj.inputMicrographs.get()
        if mics is None:
            raise InputError('viewer', 'the protocol has no input micrographs')
        files = {name: m.getFileName() for name, m in convert.micrographs_by_name(mics).items()}
        # DeepCryoPicker's tables carry no diameter; CryoSegNet's carry each mask's.
        default = obj._diameterPx() / 2.0
        chain, options = self._chain(obj)
        return picking2d_figures(files, os.path.abspath(obj._getExtraPath('picks')), self._figureDir(obj),
                                 chain=chain, chain_options=options, default_radius=default)

