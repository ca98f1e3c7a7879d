"""DISCA's checks on a kept clustering, and the refinement after them.

- Orientation check (with the acquisition's tilt range): clusters whose members, rotated with the missing
  wedge put back, cross into each other are one molecule split by its orientation to the wedge; merged
  (`orientation_transfer`, `orientation_groups`, `merge_orientations`) — unless the split check would
  split their union again (`split_decision`), which keeps noisy mixtures of different molecules apart.
- Split check: a cluster whose members' rotation-invariant spectral features fall in two clearly separated
  groups (BIC and separation) holds two molecules; split (`split_cluster`, `split_mixed`), pieces of one
  molecule left apart joined again (`_rejoin`); optionally (`orientation_guard`) a split must not look
  like one molecule in two ranges of orientations (`split_crossing`). Stored splits are replayed on new
  data (`apply_splits`).
- Stragglers: at the end, members of a cluster that form a small separate group on spectral features
  (too small for the split check's new cluster) move to the cluster they fit (`move_stragglers`).
- Refinement: after an accepted split the network is trained on the corrected clusters and the EM loop
  runs again (`refine`). A split whose two sides the refined network puts back into one cluster is not
  supported by the network's own features: it is rejected, and not made again by the checks that follow —
  unless, with the tilt range known, its sides stay apart when every member is turned with the wedge put
  back (`survives_turning`: molecule identity survives turning, orientation to the wedge does not).
"""
import warnings

import numpy as np
import torch
from scipy.spatial.transform import Rotation
from sklearn.decomposition import PCA
from sklearn.exceptions import ConvergenceWarning

from . import yopo
from .features import JOINT_VIEW_KEY, mixture_inputs, random_rotations, spectral_features
from .mixtures import _gmm, ddbi, mixture_state, posterior, project


def check_kept(best, stack, data, arch, opts, ks, rng, seed, device, say, meta, rejected=()):
    """The checks on a kept clustering: clusters that are one molecule in different orientations are
    merged (with the tilt range known), then clusters holding two molecules are split (`split_mixed`;
    splits that reproduce one of `rejected` — (side, side) member index pairs the refinement undid — are
    refused). What each check did goes into meta (replacing an earlier pass's record). When a split was
    made, the returned dict also holds 'before_split' (the clustering the split check started from) and
    'split_pieces' (per accepted split: the index of its test in meta['split_check'] and its two sides)."""
    meta.pop('orientation_merge', None)
    meta.pop('split_check', None)
    folded = []
    if opts.get('wedge_tilt') and opts.get('orientation_merge', True) and best['k'] > 1:
        best, meta['orientation_merge'], folded = merge_orientations(best, data, stack, arch, opts, rng, seed,
                                                                     device, say, min_k=ks[0] if ks else 1)
    if opts.get('split_check', True):
        # unions the orientation check joined although their spectral groups differ (the groups fold when
        # turned) are not split again
        refused = list(rejected) + list(folded)
        best, meta['split_check'] = split_mixed(best, stack, opts, ks[-1] if ks else best['k'], seed, say,
                                                rejected=refused)
        if any(t.get('accepted') for t in meta['split_check']):
            # the mixture's own chain (network or joint view) as em wrote it, then the stored splits
            chain = meta.get('prediction', 'network features -> PCA -> Gaussian mixture posterior')
            meta['prediction'] = chain.split(' -> split tests')[0] + ' -> split tests on spectral features (split_check)'
    return best


def refine(best, net, loop, train, iterate, data, first, count, stack, arch, opts, ks, rng, seed, device,
           say, meta):
    """EM iterations again after the split check changed the clusters, and the network's verdict on them.

    The self-training had taught the network to call the molecules of a split cluster one class, so its
    features still merge them and only the spectral split tests tell them apart. Here the network starts
    from the kept iteration, gets a new head for the corrected clusters and is trained on them, and the
    EM loop goes on for at most `count` iterations from those labels (K free again); the network is first
    trained on them for `refine_epochs` epochs (option, default 3), its rotated training copies with the
    wedge put back when the tilt range is known.

    A split is then judged by the network's own features: when every refined clustering puts most of both
    its sides into one cluster the split is rejected (`undone_splits`) — two molecules are kept apart once
    the network is taught them, at least right after that training, one molecule seen in two ranges of
    orientations to the missing wedge is not (the rotated training copies, with the wedge put back, teach
    it that both are one) — and no later check makes it again. With few members per molecule at low SNR
    the network cannot learn two molecules either; so, with the tilt range known, a split it never kept
    apart is kept when its sides stay apart with every member turned at random and the wedge put back
    (`survives_turning`), which one molecule split by its orientation does not.

    The refined clustering replaces the split one when its DDBI is lower than the split labels' DDBI in the
    kept iteration's feature space (the criterion that chose the kept iteration); the checks then run again
    on it, refusing the rejected splits. When the split labels win but hold a rejected split, the split
    check runs again on the clustering it started from, refusing the rejected splits. meta['refine']
    records the comparison and meta['refine']['split_check_before'] the first pass, each accepted test
    marked with the network's verdict ('undone_by_refinement')."""
    split = best
    split_score = ddbi(split['x'], split['labels'], opts['reg_covar'])
    net.load_state_dict({key[4:]: v for key, v in split['state'].items() if key.startswith('net.')})
    features = yopo.extract_features(net, data, device, batch_size=max(opts['batch_size'], 64))
    loop['labels'], loop['k'] = split['labels'].copy(), int(split['k'])
    # With the tilt range known, the refinement's rotated training copies get the wedge back where the
    # microscope leaves it: a member turned into the other side's orientations then looks like a member of
    # the other side but keeps its own label, so the network cannot learn a split by orientation to the
    # wedge (a plain rotation turns the wedge with the molecule and leaves that relation learnable).
    wedge_training = opts.get('wedge_training')
    opts['wedge_training'] = bool(opts.get('wedge_tilt')) or bool(wedge_training)
    try:
        # A few epochs on the split labels first, so that two molecules get a fair chance to be learnt
        # before the network's own clustering is asked whether it keeps them apart.
        epochs = max(1, int(opts.get('refine_epochs', 3)))
        for epoch in range(epochs):
            fitted = train(features, split['labels'], int(split['k']), epoch == 0)
        say(f"refinement: network trained on the {split['k']} clusters of the split check for {epochs} "
            f"epoch{'s' if epochs > 1 else ''} (loss {fitted['loss']:.4f}"
            f"{', wedge put back on the rotated copies' if opts['wedge_training'] else ''}); "
            f"{count} more iterations at most")
        # Its first clustering still sees features trained on the merged clusters for all but one epoch (as
        # the untrained network's at iteration 0 of the main loop): not eligible when there are later ones.
        refined = iterate(first, count, first + 1 if count > 1 else first, 0, 'refine')
    finally:
        opts['wedge_training'] = wedge_training
    first_pass = meta.get('split_check')
    info = {'from_iteration': int(split['iteration']), 'k_split': int(split['k']), 'ddbi_split': split_score,
            'first_iteration': int(first), 'training_loss': fitted['loss'], 'split_check_before': first_pass}
    # The network's verdict: every clustering of the refinement, from the first (right after its training
    # on the split labels) to the last; a split it never kept apart is undone.
    verdict = loop['iteration_labels'][first:] or [loop['labels']]
    survives = None
    if opts.get('wedge_tilt'):
        def survives(sides):
            return survives_turning(stack, sides, opts['wedge_tilt'], seed)
    rejected = undone_splits(split.get('split_pieces', []), verdict, first_pass, say, survives=survives)
    info['rejected'] = len(rejected)
    # A refined clustering that puts both sides of a split the verdict supports into one cluster
    # contradicts it, whatever its DDBI: the split labels stay (at SNR 0.01 and 60 per molecule a refined
    # K 3 that merged two supported splits won on DDBI and the check could split only one of them again:
    # bench/README.md §2).
    merges = 0 if refined is None else supported_merged(split.get('split_pieces', []), first_pass, refined['labels'])
    info['merges_supported_splits'] = merges
    if refined is None or refined['ddbi'] >= split_score or merges:
        info['kept'] = False
        meta['refine'] = info
        if not rejected:
            if merges:
                say(f"refinement: the refined clustering (K={refined['k']}, DDBI {refined['ddbi']:.4f}) puts the "
                    f"sides of {merges} supported split{'s' if merges > 1 else ''} into one cluster: split "
                    f"clustering kept")
            else:
                say(f"refinement: split clustering kept (DDBI {split_score:.4f} ≤ "
                    f"{'-' if refined is None else round(refined['ddbi'], 4)})")
            return split
        say(f"refinement: split clustering kept over the refined one (DDBI {split_score:.4f} against "
            f"{'-' if refined is None else round(refined['ddbi'], 4)}, {merges} supported split"
            f"{'' if merges == 1 else 's'} merged there), but the network undid {len(rejected)} of its splits: "
            f"split check again without them")
        before = split['before_split']
        again, meta['split_check'] = split_mixed(before, stack, opts, ks[-1] if ks else before['k'], seed, say,
                                                 rejected=rejected)
        if not any(t.get('accepted') for t in meta['split_check']):
            meta['prediction'] = meta['prediction'].split(' -> split tests')[0]
        meta['refine'] = info
        return again
    info.update({'kept': True, 'iteration': int(refined['iteration']), 'k_refined': int(refined['k']),
                 'ddbi_refined': refined['ddbi']})
    say(f"refinement: kept iteration {refined['iteration']}: K={refined['k']} DDBI={refined['ddbi']:.4f} "
        f"(split labels {split_score:.4f})")
    meta['prediction'] = meta['prediction'].split(' -> split tests')[0]
    refined = check_kept(refined, stack, data, arch, opts, ks, rng, seed, device, say, meta, rejected=rejected)
    meta['refine'] = info
    return refined


def undone_splits(pieces, refined_labels, tests, say, survives=None):
    """The accepted splits that the refined network does not support.

    pieces: per accepted split, {'test': index into tests, 'sides': (members of side 0, members of side 1)}
    (global indices, as the split made them); refined_labels: the labels of one refined clustering, or a
    list of them (every refinement iteration). A split is undone — and rejected — when, in every one of
    them, the refined cluster holding the most of one side is also the one holding the most of the other:
    one molecule split by its orientation to the wedge cannot be learnt from copies with the wedge put back,
    so no refined clustering separates it; two molecules that the network separated once it was taught
    them, even if its self-training merged them again later (as it does at low SNR and small N), are two.
    The test dicts get 'refined_shares' (share of each side in its own most common cluster of the last
    clustering), 'refined_apart' (in how many of the clusterings the sides were apart) and
    'undone_by_refinement'.

    survives (optional, with the tilt range known): callable (side 0, side 1) -> (bool, info), asked about a
    split the network never kept apart; True keeps it (`survives_turning`: the sides stay apart when every
    member is turned with the wedge put back, which one molecule split by its orientation does not; at low
    SNR and few members per molecule the network cannot learn two molecules either, bench/README.md §2).
    Its info goes into the test dict ('turned'). Returns the (side 0, side 1) pairs of the rejected splits."""
    labelings = [refined_labels] if isinstance(refined_labels, np.ndarray) else list(refined_labels)
    rejected = []
    for piece in pieces:
        p, q = (np.asarray(v) for v in piece['sides'])
        apart = 0
        for labels in labelings:
            lp, lq = labels[p], labels[q]
            home_p, home_q = int(np.bincount(lp).argmax()), int(np.bincount(lq).argmax())
            apart += home_p != home_q
        undone = apart == 0
        test = tests[piece['test']] if tests is not None else {}
        test.update({'refined_shares': [round(float(np.mean(lp == home_p)), 4), round(float(np.mean(lq == home_q)), 4)],
                     'refined_apart': [int(apart), len(labelings)]})
        if undone and survives is not None:
            kept, test['turned'] = survives((p, q))
            if kept:
                undone = False
                say(f"refinement: the network put the two sides of the split of cluster {test.get('cluster')} "
                    f"({len(p)} + {len(q)}) back into one cluster, but they stay apart when turned with the wedge "
                    f"put back (separation {test['turned']['turned']:.2f}, {test['turned']['ratio']:.2f} of the "
                    f"members'): two molecules the network has too few examples of to learn, split kept")
        test['undone_by_refinement'] = bool(undone)
        if undone:
            rejected.append((p, q))
            say(f"refinement: the network put the two sides of the split of cluster {test.get('cluster')} "
                f"({len(p)} + {len(q)}) back into one cluster: split rejected (not supported by its features)")
    return rejected


def supported_merged(pieces, tests, labels):
    """How many accepted splits that the network's verdict supports (not 'undone_by_refinement' in their
    test) a clustering undoes: the cluster holding the most of one side also holds the most of the other."""
    merged = 0
    for piece in pieces:
        if tests is not None and tests[piece['test']].get('undone_by_refinement'):
            continue
        p, q = (np.asarray(v) for v in piece['sides'])
        merged += int(np.bincount(labels[p]).argmax() == np.bincount(labels[q]).argmax())
    return merged


def _reproduces(members, side, rejected, min_agreement=0.8):
    """Whether a proposed split (members, side 0/1) separates again the two sides of a rejected split:
    it holds at least half of each of that split's sides, and at least `min_agreement` of those members
    fall on the sides as before (either way round)."""
    for p, q in rejected:
        in_p, in_q = np.isin(members, p), np.isin(members, q)
        if in_p.sum() < 0.5 * len(p) or in_q.sum() < 0.5 * len(q):
            continue
        covered = int(in_p.sum() + in_q.sum())
        agree = (np.sum(side[in_p] == 0) + np.sum(side[in_q] == 1)) / covered
        if max(agree, 1.0 - agree) >= min_agreement:
            return True
    return False


# ------------------------------------------------------------------------- orientation-split clusters

ORIENTATION_MIN_SHARE = 0.1
ORIENTATION_MIN_HELD = 0.8
ORIENTATION_MIN_EXCHANGE = 0.5
ORIENTATION_MAX_KEEP = 0.2


def orientation_transfer(data, net, state, labels, tilt_range, rng, device='cpu', batch_size=64, copies=2,
                         stack=None):
    """Where rotated copies of each cluster's members are assigned, against unrotated controls.

    Every member gets `copies` uniformly random rotations with the acquisition's missing wedge put back
    (`random_rotations(tilt_range=)`), i.e. it is shown as the same molecule in other orientations; the
    kept network, PCA and mixture assign the copies. transfer[a, b] = share of cluster a's copies assigned
    to b. control[a, b] = the same for copies turned by a half turn about X, Y or Z (one at random each):
    the missing wedge (tilt axis Y) maps onto itself, so the copy is again a real view of the molecule, in
    the same orientation to the wedge — what changes cluster there is the features' noise under turning,
    not orientation. (Identity copies, the control until 2026-12-06, are the same data and never change
    cluster; at SNR 0.01 turned copies of two different molecules crossed by 0.18–0.23 from that noise
    alone and were merged into one cluster: bench/README.md §2.) With a joint-view mixture
    (`features.mixture_inputs`) the raw subtomograms `stack` are turned by the same rotations for the
    rotation-invariant half of the features. Returns (transfer, control), K×K.
    """
    k = int(labels.max()) + 1
    n = len(data)
    joint = JOINT_VIEW_KEY in state
    if joint and stack is None:
        raise ValueError('a joint-view mixture needs the raw subtomograms to assign turned copies')

    def assign(matrices):
        copies_stack = random_rotations(data, rng, tilt_range=tilt_range, matrices=matrices)
        feats = yopo.extract_features(net, copies_stack, device, batch_size)
        raw = random_rotations(np.asarray(stack), rng, tilt_range=tilt_range, matrices=matrices) if joint else None
        return posterior(project(state, mixture_inputs(state, feats, raw)), state).argmax(axis=1)

    def shares(assigned, members):
        table = np.zeros((k, k))
        np.add.at(table, (members, assigned), 1.0)
        return table / np.maximum(table.sum(axis=1, keepdims=True), 1.0)

    # the rotations drawn from `rng` as `random_rotations` itself would draw them
    moved = [assign(Rotation.random(n, random_state=rng).as_matrix()) for _ in range(int(copies))]
    transfer = shares(np.concatenate(moved), np.tile(labels, int(copies)))
    half_turns = np.array([np.diag(d) for d in ((1.0, -1.0, -1.0), (-1.0, 1.0, -1.0), (-1.0, -1.0, 1.0))])
    control = shares(assign(half_turns[rng.integers(0, 3, size=n)]), labels)
    return transfer, control


def partner_is_main_source(transfer, group_a, group_b):
    """Whether each of two groups of clusters receives more of its partner's turned copies than of any
    third cluster's (the largest share of one partner cluster's copies landing in the group against the
    largest share of one outside cluster's). The turned views of a molecule split by its orientation to the
    wedge land mostly in its other half; where the network's features are blind to the molecule (clusters of
    mixed molecules at SNR 0.01) turned copies arrive from every cluster alike, and a pair can cross both ways
    and hold its copies without being one molecule (bench/README.md §2, N = 1 000, SNR 0.01 ±40°, seed 0:
    cluster 2 received 0.17 of its partner's copies and 0.32 of the third cluster's, and the join of the two
    mixed clusters lowered the V-measure from 0.407 to 0.278)."""
    transfer = np.asarray(transfer)
    outside = [c for c in range(len(transfer)) if c not in group_a and c not in group_b]
    for receiver, partner in ((group_a, group_b), (group_b, group_a)):
        from_partner = max(transfer[y, receiver].sum() for y in partner)
        from_outside = max((transfer[c, receiver].sum() for c in outside), default=0.0)
        if not from_partner > from_outside:
            return False
    return True


def orientation_groups(transfer, control, min_share=ORIENTATION_MIN_SHARE, allowed=None,
                       min_held=ORIENTATION_MIN_HELD, min_groups=1, min_exchange=ORIENTATION_MIN_EXCHANGE,
                       nearest=None, max_keep=ORIENTATION_MAX_KEEP, allowed_nearest=None, specific=True):
    """Clusters to merge: a and b are one molecule seen in different orientations when turning the
    members of each sends at least `min_share` more of them into the other than the half-turn control
    does — in both directions (different molecules stay put however they are turned; the views of one
    molecule cross over both ways) — or when the half turns alone move at least `min_exchange` of the
    pair's copies between a and b (shares a→b plus b→a of the control): a half turn keeps each member's
    orientation to the wedge and does not make one molecule look like another, so a split it undoes is
    not one of molecules. (At 200 per molecule the network cut the 20S by a property that a half turn
    already changes: the control crossed 0.42 + 0.30 and 0.74 + 0.02, so the gains over it vanished;
    between clusters of different molecules the control's exchange was ≤ 0.25 in every stored run,
    bench/README.md §2.) Either way at least `min_held` of each one's turned members must be held by the
    pair: not lost to a third cluster c, unless c's own turned copies (almost) never land in a or b (less
    than `min_share` / 2 of them). Turned views of one molecule can look like a related one (the 20S
    proteasome is the core of the 26S) while the related molecule's copies stay put; copies scattered
    over clusters that all send some of theirs to one another are features blind to the molecule. And with
    `specific` (default) each of the pair must receive more of its partner's turned copies than of any
    third cluster's (`partner_is_main_source`).
    allowed (optional): callable (group a, group b) -> bool, asked before two groups (lists of cluster
    indices) are joined; a refusal keeps them apart. Returns a list of groups (sorted lists of cluster
    indices), one per resulting cluster, ordered by their smallest member.

    nearest (optional): callable cluster index -> the other cluster its members lie nearest to on
    rotation-invariant features (or None). A cluster that keeps fewer than `max_keep` of its own turned
    copies is no molecule — the network knows its members only in the orientations they have — and joins
    that cluster (at ±40°, 200 per molecule, the 20S halves kept 0.08 and 0.30 and sent their copies to the
    26S cluster, while their half turns exchanged only 0.33; clusters of molecules kept ≥ 0.31 in every
    stored run, mixed ones at SNR 0.01 ≥ 0.45). Asked after the pairs, weakest keeper first, under
    `min_groups` and `allowed_nearest` (default: `allowed`), called (group of the nearest, group of a).

    Pairs are joined strongest first (by the smaller of their two gains), and never below `min_groups`
    groups (the run's smallest K: with two clusters every turned copy stays "within the pair", and a
    merge to one cluster undid a K the user's range excludes)."""
    k = len(transfer)
    gain = np.asarray(transfer) - np.asarray(control)
    parent = list(range(k))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def members(r):
        return sorted(i for i in range(k) if root(i) == r)

    transfer = np.asarray(transfer)

    def held(a, b):
        outside = [c for c in range(k) if c not in (a, b) and transfer[c, a] + transfer[c, b] >= min_share / 2]
        return min(1.0 - transfer[x, outside].sum() for x in (a, b))

    exchange = np.asarray(control) + np.asarray(control).T

    def strength(a, b):
        """How far the pair is past the nearer of its two bars (each relative to the bar)."""
        return max(min(gain[a, b], gain[b, a]) / min_share, exchange[a, b] / min_exchange)

    pairs = sorted(((a, b) for a in range(k) for b in range(a + 1, k)), key=lambda ab: -strength(*ab))
    n_groups = k
    for a, b in pairs:
        # ... and the pair holds the turned copies of each (at SNR 0.01 a network whose features ignore
        # the molecule scatters them over every cluster, and the gains alone merged five molecules into
        # one cluster: bench/README.md §2, 60 per molecule; counting every copy outside the pair instead
        # refused the two orientation halves of the 20S at N = 1 000, whose small half sent 24 % of its
        # copies to the 26S cluster, none of whose copies came back; at SNR 0.01 ±40° 11 % coming back
        # marked a pair of mixed clusters that must stay apart)
        crossing = (gain[a, b] >= min_share and gain[b, a] >= min_share) or exchange[a, b] >= min_exchange
        if (crossing and held(a, b) >= min_held
                and root(a) != root(b) and n_groups > min_groups
                and (not specific or partner_is_main_source(transfer, members(root(a)), members(root(b))))):
            if allowed is None or allowed(members(root(a)), members(root(b))):
                parent[root(b)] = root(a)
                n_groups -= 1
    if nearest is not None:
        for a in sorted((i for i in range(k) if transfer[i, i] < max_keep), key=lambda i: transfer[i, i]):
            b = nearest(a)
            if b is None or root(a) == root(b) or n_groups <= min_groups:
                continue
            judge = allowed_nearest or allowed
            if judge is None or judge(members(root(b)), members(root(a))):
                parent[root(a)] = root(b)
                n_groups -= 1
    groups = {}
    for i in range(k):
        groups.setdefault(root(i), []).append(i)
    return sorted((sorted(g) for g in groups.values()), key=lambda g: g[0])


# ------------------------------------------------------------------------------------- mixed clusters

SPLIT_DIM = 2
SPLIT_MIN_SEPARATION = 3.0
SPLIT_MAX_DEPTH = 3
SPLIT_MAX_CROSSING = 0.5


def _standardised(x, mean, std):
    return (np.asarray(x, dtype=np.float64) - mean) / std


def split_cluster(features, options, seed=0, dim=SPLIT_DIM, min_separation=SPLIT_MIN_SEPARATION,
                  min_size=10):
    """Test whether one cluster's members form two groups; return (accepted, side (N,) 0/1, state, info).

    features: (N, F) rotation-invariant features of the members (`spectral_features`). They are
    standardised over the members — so that what varies inside this cluster, not between clusters, sets
    the scale — and reduced by PCA to `dim` dimensions, where one and two full-covariance Gaussians are
    fitted. The split is accepted when two components have the lower BIC, both sides hold at least
    `min_size` members, and the two means lie at least `min_separation` apart in the Mahalanobis metric
    of the pooled covariance. BIC alone is not enough: a two-component fit to one noisy, non-Gaussian
    group can win by a little, with the means only ≈ 1–2.5 apart (Ashman's D; measured 3.1–4.6 on two
    merged molecules, 2.7 on one molecule split by its orientation to the wedge at SNR 0.1, 1.3 for a
    skewed single group — bench/README.md §2). `state` holds the standardisation,
    PCA and two-component mixture as tensors (for the model file; `split_side` applies it).
    """
    x = np.asarray(features, dtype=np.float64)
    info = {'members': int(len(x)), 'accepted': False}
    if len(x) < 2 * min_size:
        info['reason'] = 'too few members'
        return False, None, None, info
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-8
    z = _standardised(x, mean, std)
    pca = PCA(n_components=int(min(dim, z.shape[1], len(z) - 1)), random_state=seed).fit(z)
    p = pca.transform(z)
    fits = []
    for k in (1, 2):
        gmm = _gmm(k, options, seed, 1e-4)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', ConvergenceWarning)
            gmm.fit(p)
        fits.append(gmm)
    one, two = fits
    side = two.predict(p)
    pooled = np.einsum('k,kij->ij', two.weights_, two.covariances_)
    delta = two.means_[1] - two.means_[0]
    separation = float(np.sqrt(delta @ np.linalg.solve(pooled, delta)))
    sizes = np.bincount(side, minlength=2)
    info.update({'bic_one': float(one.bic(p)), 'bic_two': float(two.bic(p)), 'separation': separation,
                 'sizes': sizes.tolist()})
    if info['bic_two'] >= info['bic_one']:
        info['reason'] = 'one Gaussian explains the members as well (BIC)'
    elif separation < min_separation:
        info['reason'] = f'the two groups are not separated (Mahalanobis {separation:.2f} < {min_separation:g})'
    elif sizes.min() < min_size:
        info['reason'] = f'one side would hold fewer than {min_size} members'
    else:
        info['accepted'] = True
        state = mixture_state(pca, two, np.array([0, 1]))
        state.update({'scale.mean': torch.from_numpy(mean), 'scale.std': torch.from_numpy(std)})
        return True, side, state, info
    return False, None, None, info


def split_side(features, state):
    """Posterior (N, 2) of the two sides of a stored split for members' spectral features."""
    z = _standardised(features, state['scale.mean'].numpy(), state['scale.std'].numpy())
    return posterior(project(state, z), state)


TURNED_MIN_SEPARATION = 2.0
TURNED_MIN_RATIO = 0.45


def _side_separation(features, side, dim=SPLIT_DIM, seed=0):
    """Mahalanobis distance (pooled within-side covariance) between the means of the two sides, in the
    first `dim` principal components of the features standardised over all rows."""
    x = np.asarray(features, dtype=np.float64)
    z = (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-8)
    p = PCA(n_components=int(min(dim, z.shape[1], len(z) - 1)), random_state=seed).fit_transform(z)
    a, b = p[side == 0], p[side == 1]
    pooled = (np.atleast_2d(np.cov(a.T)) * len(a) + np.atleast_2d(np.cov(b.T)) * len(b)) / len(p)
    delta = a.mean(axis=0) - b.mean(axis=0)
    return float(np.sqrt(delta @ np.linalg.solve(pooled, delta)))


def survives_turning(stack, sides, tilt_range, seed, copies=2, min_separation=TURNED_MIN_SEPARATION,
                     min_ratio=TURNED_MIN_RATIO):
    """Whether the two sides of a split stay apart when every member is shown in other orientations.

    Each member is turned at random `copies` times with the acquisition's missing wedge put back
    (`random_rotations`) and keeps its side. Molecule identity survives turning; a member's orientation to
    the wedge does not (its copy takes the new orientation's wedge, the old one only faintly, through the
    second wedge), so one molecule split by its orientation falls back towards one group while two
    molecules stay two. Measured on the true classes of simulated sets (`bench_disca_split.py --truth
    --turned`, bench/README.md §2; 60 per molecule, SNR 0.1-0.01, ±60° and ±40°, seeds 0 and 1): the two
    halves of one molecule's best two-Gaussian fit kept 0.4-1.8 of separation in 59 of 60 cases (2.4 once,
    a fit with a side too small for the split check), while the pairs of molecules the split check splits
    kept ≥ 2 (and ≥ 0.45 of their separation) in 57 of 57 cases at ±60° and in 41 of 50 at ±40° (the
    second wedge there leaves less to see). The separation is `_side_separation` on the spectral features,
    of the copies (both sides' copies together) and of the members; a split is kept with at least
    `min_separation` and `min_ratio` of the members' separation. Returns (kept, info)."""
    p, q = (np.asarray(v) for v in sides)
    members = np.concatenate([p, q])
    side = np.concatenate([np.zeros(len(p), dtype=int), np.ones(len(q), dtype=int)])
    rng = np.random.default_rng(seed + 15485863)
    stack = np.asarray(stack)
    original = _side_separation(spectral_features(stack[members]), side, seed=seed)
    turned_features = np.concatenate([spectral_features(random_rotations(stack[members], rng, tilt_range=tilt_range))
                                      for _ in range(int(copies))])
    turned = _side_separation(turned_features, np.tile(side, int(copies)), seed=seed)
    ratio = turned / max(original, 1e-8)
    kept = turned >= min_separation and ratio >= min_ratio
    return bool(kept), {'original': round(original, 4), 'turned': round(turned, 4), 'ratio': round(ratio, 4),
                        'kept': bool(kept)}


def split_crossing(stack, members, side, state, tilt_range, rng, copies=2):
    """Whether a split is one molecule seen in two ranges of orientations: the members of each side are
    rotated at random with the acquisition's missing wedge put back (`random_rotations`) and assigned
    to a side again; the same with identity rotations is the control. Returns the share of rotated copies
    that changed side, summed over the two sides, minus the same sum for the control. For one molecule
    split by orientation a rotated copy lands on a side in proportion to that side's range of
    orientations, so the shares sum to about 1; for two molecules they stay near 0 (measured 0.21–0.34
    for merged molecules at SNR 0.01–0.03, 0.57–0.83 for orientation splits — bench/README.md §2)."""
    stack = np.asarray(stack)
    members = np.asarray(members)
    side = np.asarray(side)

    def moved(matrices):
        q = split_side(spectral_features(random_rotations(stack[members], rng, tilt_range=tilt_range,
                                                           matrices=matrices)), state)
        new_side = (q[:, 1] > q[:, 0]).astype(int)
        return sum(float(np.mean(new_side[side == s] != s)) for s in (0, 1))

    turned = np.mean([moved(None) for _ in range(int(copies))])
    control = moved(np.broadcast_to(np.eye(3), (len(members), 3, 3)))
    return float(turned - control)


def split_decision(stack, features, members, opts, seed, rng):
    """Whether the split check splits these members: `split_cluster` on their spectral features and, with
    the option `orientation_guard` and the tilt range known (`wedge_tilt`), `split_crossing` below
    `SPLIT_MAX_CROSSING`. The one rule shared by the split check and the orientation check's merges.
    Returns split_cluster's tuple, with 'crossing' in the info when measured.

    The guard is off by default: on the true classes of simulated sets (bench/README.md §2) two different
    molecules crossed as much as one molecule split by its orientation (TRiC and 26S proteasome 0.61–1.15
    at SNR 0.1–0.03, against 0.44–0.83 for orientation splits), so it refused real splits; the refinement's
    network judges orientation splits instead (`refine`)."""
    accepted, side, state, info = split_cluster(features[members], opts, seed, min_size=int(opts['min_per_cluster']))
    tilt_range = opts.get('wedge_tilt')
    if accepted and tilt_range and opts.get('orientation_guard', False):
        info['crossing'] = split_crossing(stack, members, side, state, tilt_range, rng)
        if info['crossing'] >= SPLIT_MAX_CROSSING:
            accepted = info['accepted'] = False
            info['reason'] = (f"one molecule in two ranges of orientations (rotated members change side: "
                              f"{info['crossing']:.2f} ≥ {SPLIT_MAX_CROSSING:g})")
    return accepted, side, state, info


def split_mixed(best, stack, opts, k_max, seed, say, rejected=()):
    """Run `split_cluster` on every kept cluster, and again on the two sides of an accepted split (to
    `SPLIT_MAX_DEPTH` levels, K at most k_max). An accepted split gives the second side a new label; the
    node (parent label, child label, state) is stored in the model so that prediction replays the splits
    in the same order. Each test is `split_decision`; a split that separates
    again the sides of one of `rejected` (pairs of member indices whose split the refinement undid) is
    refused. Returns (updated best, one info dict per test); when something was split, the updated best
    also holds 'before_split' (best as given) and 'split_pieces' (see `check_kept`)."""
    features = spectral_features(stack)
    rng = np.random.default_rng(seed + 7919)
    labels = best['labels'].copy()
    prob = best['probabilities'].copy()
    state = dict(best['state'])
    k = int(best['k'])
    tests, nodes, pieces = [], 0, []
    queue = [(c, 0) for c in range(k)]
    while queue:
        c, depth = queue.pop(0)
        if depth >= SPLIT_MAX_DEPTH or k >= k_max:
            continue
        members = np.flatnonzero(labels == c)
        accepted, side, node_state, info = split_decision(stack, features, members, opts, seed, rng)
        info.update({'kind': 'split', 'cluster': int(c), 'depth': depth})
        tests.append(info)
        if accepted and len(rejected) and _reproduces(members, side, rejected):
            accepted = info['accepted'] = False
            info['reason'] = ('split undone: already judged one molecule (the refined network put its sides '
                              'back together, or they fold when turned)')
            say(f"split check: cluster {c} ({len(members)}) would be split along a split already judged one "
                f"molecule (undone by the refinement, or folding when turned): kept whole")
        if not accepted:
            continue
        pieces.append({'test': len(tests) - 1, 'sides': (members[side == 0], members[side == 1])})
        labels[members[side == 1]] = k
        q = split_side(features, node_state)
        prob = np.concatenate([prob, prob[:, c:c + 1] * q[:, 1:2]], axis=1)
        prob[:, c] *= q[:, 0]
        state.update({f'split.{nodes}.{key}': v for key, v in node_state.items()})
        state[f'split.{nodes}.labels'] = torch.tensor([c, k], dtype=torch.int64)
        info['child'] = k
        say(f"split check: cluster {c} ({len(members)}) is two groups on spectral features "
            f"(separation {info['separation']:.2f}, sizes {info['sizes']}) → clusters {c} and {k}")
        queue += [(c, depth + 1), (k, depth + 1)]
        k += 1
        nodes += 1
    if nodes == 0:
        say('split check: no cluster is two groups on spectral features')
        return best, tests
    touched = sorted({t['cluster'] for t in tests if t['accepted']} | {t['child'] for t in tests if t['accepted']})
    final_of, rejoins = _rejoin(features, labels, touched, opts, seed, say)
    tests += rejoins
    state['splitmap.final_of'] = torch.from_numpy(final_of)
    labels, prob = _relabel(final_of, labels, prob)
    best = dict(best, labels=labels, k=prob.shape[1], state=state, probabilities=prob, before_split=best,
                split_pieces=pieces)
    return best, tests


def _rejoin(features, labels, touched, opts, seed, say):
    """Join again the pieces of one molecule that splits of different clusters left apart.

    When two clusters each held part of the same molecule (mixed with a different one), the splits leave
    that molecule in two clusters. Among the clusters the splits made or changed, a pair whose union
    `split_cluster` does not split is one group; the closest such pair (lowest separation) is joined, and
    the test repeated until no pair qualifies. Returns (final label of each label (int64 array, compact,
    in order of first appearance), one info dict per tested pair)."""
    groups = {c: [c] for c in touched}
    tests = []
    while True:
        candidates = []
        keys = sorted(groups)
        for i, a in enumerate(keys):
            for b in keys[i + 1:]:
                members = np.flatnonzero(np.isin(labels, groups[a] + groups[b]))
                split, _, _, info = split_cluster(features[members], opts, seed,
                                                  min_size=int(opts['min_per_cluster']))
                info = {'kind': 'rejoin', 'clusters': [int(a), int(b)], 'members': info['members'],
                        'separation': info.get('separation'), 'one_group': not split,
                        'joined': False}
                tests.append(info)
                if not split:
                    candidates.append((info['separation'] if info['separation'] is not None else 0.0, a, b, info))
        if not candidates:
            break
        _, a, b, info = min(candidates, key=lambda c: c[0])
        info['joined'] = True
        groups[a] += groups.pop(b)
        say(f"split check: clusters {a} and {b} are one group on spectral features → joined")
    n = int(labels.max()) + 1
    root = np.arange(n)
    for a, members in groups.items():
        root[members] = a
    _, final_of = np.unique(root, return_inverse=True)
    return final_of.astype(np.int64), tests


def _relabel(final_of, labels, prob):
    """Labels and probability columns mapped through `final_of` (joined clusters' columns summed)."""
    out = np.zeros((len(prob), int(final_of.max()) + 1))
    np.add.at(out.T, final_of, prob.T)
    return final_of[labels], out


def apply_splits(stack, state, labels, prob):
    """Replay the stored splits (`split_mixed`) on new subtomograms: labels follow the splits in order
    (a member of the parent goes to the side its spectral features fall on); probabilities of the parent
    are shared between the two sides by the split's posterior. Then the stored straggler rule
    (`move_stragglers`) moves members, as it did the training set's."""
    n_nodes = len({key.split('.')[1] for key in state if key.startswith('split.')})
    if n_nodes == 0 and 'straggler.means' not in state:
        return labels, prob
    features = spectral_features(stack)
    for i in range(n_nodes):
        prefix = f'split.{i}.'
        node = {key[len(prefix):]: v for key, v in state.items() if key.startswith(prefix)}
        parent, child = (int(v) for v in node['labels'])
        q = split_side(features, node)
        labels = np.where((labels == parent) & (q[:, 1] > q[:, 0]), child, labels)
        prob = np.concatenate([prob, prob[:, parent:parent + 1] * q[:, 1:2]], axis=1)
        prob[:, parent] *= q[:, 0]
    if 'splitmap.final_of' in state:
        labels, prob = _relabel(state['splitmap.final_of'].numpy(), labels, prob)
    if 'straggler.means' in state:
        labels, prob = _apply_moves(labels, prob, *_straggler_moves(features, state, labels))
    return labels, prob



def group_index(groups):
    """Per old cluster, the index of its group in `groups` (lists of old cluster indices, as
    `orientation_groups` returns them): the map from old labels to merged ones."""
    new_of_old = np.empty(sum(len(g) for g in groups), dtype=np.int64)
    for j, g in enumerate(groups):
        new_of_old[g] = j
    return new_of_old


def orientation_decision(transfer, control, stack, labels, opts, seed, say, min_k=1):
    """`orientation_groups` with the spectral judges: a join is refused when the union is two groups on
    spectral features (`split_decision`), and a cluster that keeps too few of its turned copies joins the
    cluster nearest to it on spectral features — there even when the union is two spectral groups, if
    those two do not survive turning (`survives_turning`: at ±40° the spectral features of the 20S halves
    still showed their orientation to the wedge, separation 3.17, as the split check's would). Returns
    (groups, vetoed joins, folded: (side, side) member indices of each such union's spectral split, for the
    split check to refuse)."""
    labels = np.asarray(labels)
    k = len(transfer)
    features, vetoed, folded = None, [], []
    check_rng = np.random.default_rng(seed + 104729)

    def spectral():
        nonlocal features
        if features is None:
            features = spectral_features(stack)
        return features

    def allowed(group_a, group_b):
        members = np.flatnonzero(np.isin(labels, group_a + group_b))
        split, _, _, test = split_decision(stack, spectral(), members, opts, seed, check_rng)
        if split:
            vetoed.append({'clusters': [group_a, group_b], 'separation': test.get('separation'),
                           'crossing': test.get('crossing'), 'sizes': test.get('sizes')})
            say(f"orientation check: clusters {group_a} and {group_b} cross when turned, but their union is two "
                f"groups on spectral features (separation {test['separation']:.2f}): kept apart")
        return not split

    def nearest(a):
        """The cluster whose members lie nearest to cluster a's on spectral features (the split check's
        separation statistic)."""
        separations = {}
        for b in range(k):
            pair = np.flatnonzero(np.isin(labels, [a, b]))
            if b != a and np.sum(labels == b) >= 2 and np.sum(labels == a) >= 2:
                separations[b] = _side_separation(spectral()[pair], (labels[pair] == b).astype(int), seed=seed)
        return min(separations, key=separations.get) if separations else None

    def allowed_nearest(group_b, group_a):
        members = np.flatnonzero(np.isin(labels, group_a + group_b))
        split, side, _, test = split_decision(stack, spectral(), members, opts, seed, check_rng)
        if not split:
            return True
        sides = (members[side == 0], members[side == 1])
        kept, turned = survives_turning(stack, sides, opts['wedge_tilt'], seed)
        if kept:
            vetoed.append({'clusters': [group_b, group_a], 'separation': test.get('separation'),
                           'sizes': test.get('sizes'), 'turned': turned})
            say(f"orientation check: cluster {group_a} keeps few of its turned copies, but its union with the "
                f"nearest {group_b} is two groups on spectral features that stay apart when turned "
                f"(separation {test['separation']:.2f}, turned {turned['turned']:.2f}): kept apart")
            return False
        folded.append(sides)
        say(f"orientation check: cluster {group_a} keeps few of its turned copies; its union with the nearest "
            f"{group_b} is two groups on spectral features (separation {test['separation']:.2f}) that fold when "
            f"turned (separation {turned['turned']:.2f}): one molecule")
        return True

    groups = orientation_groups(transfer, control, opts.get('orientation_min_share', ORIENTATION_MIN_SHARE),
                                allowed=allowed, min_groups=max(1, int(min_k)), nearest=nearest,
                                allowed_nearest=allowed_nearest)
    return groups, vetoed, folded


def merge_orientations(best, data, stack, arch, opts, rng, seed, device, say, min_k=1):
    """Merge the kept clusters that `orientation_groups` finds to be one molecule in different
    orientations, unless the split check would split their union again (`split_decision`: two clearly
    separated groups of spectral features). On noisy data rotated copies scatter
    across impure clusters of the same molecules, and the transfer test alone merged different molecules
    (bench/README.md §2, SNR 0.01); the spectral test keeps such a union apart, as the split check would.
    Returns (updated best, details for the model's meta — 'vetoed' lists the refused joins —, the folded
    spectral splits of `orientation_decision`)."""
    net = yopo.build_features(arch)
    net.load_state_dict({key[4:]: v for key, v in best['state'].items() if key.startswith('net.')})
    net.to(device)
    with yopo.DeterministicTorch(device):
        transfer, control = orientation_transfer(data, net, best['state'], best['labels'], opts['wedge_tilt'],
                                                 rng, device, max(opts['batch_size'], 64), stack=stack)
    groups, vetoed, folded = orientation_decision(transfer, control, stack, best['labels'], opts, seed, say,
                                                  min_k)
    info = {'tilt_range': float(opts['wedge_tilt']), 'transfer': np.round(transfer, 4).tolist(),
            'control': np.round(control, 4).tolist(), 'groups': groups, 'k_before': int(best['k']),
            'vetoed': vetoed, 'folded': [[len(p), len(q)] for p, q in folded]}
    if len(groups) == best['k']:
        say("orientation check: no two clusters are one molecule in different orientations")
        return best, info, folded
    new_of_old = group_index(groups)
    state = dict(best['state'])
    label_of = state['gmm.label_of_component'].numpy()
    state['gmm.label_of_component'] = torch.from_numpy(
        np.where(label_of >= 0, new_of_old[np.maximum(label_of, 0)], -1).astype(np.int64))
    labels = new_of_old[best['labels']]
    say(f"orientation check: merged {[g for g in groups if len(g) > 1]} (one molecule in different "
        f"orientations) → K={len(groups)}")
    best = dict(best, labels=labels, k=len(groups), state=state, probabilities=posterior(best['x'], state))
    return best, info, folded


# ------------------------------------------------------------------------------------- stragglers

STRAGGLER_DIM = 6


def _straggler_space(features, state):
    """Spectral features in the common space of the clusters' fits: standardised, PCA."""
    z = _standardised(features, state['straggler.scale.mean'].numpy(), state['straggler.scale.std'].numpy())
    return (z - state['straggler.pca.mean'].numpy()) @ state['straggler.pca.components'].numpy().T


def _straggler_distances(features, state):
    """(N, K) squared Mahalanobis distances (pooled within-cluster covariance) of the members' spectral
    features to each cluster's mean."""
    y = _straggler_space(features, state)
    means = state['straggler.means'].numpy()
    precision = state['straggler.precision'].numpy()
    delta = y[:, None, :] - means[None, :, :]
    return np.einsum('nkd,de,nke->nk', delta, precision, delta)


def _straggler_moves(features, state, labels):
    """(members, new labels) of the stored straggler rule: a member of cluster c that falls on the small
    side of c's stored two-group fit moves to the cluster whose spectral fit is nearest, when that is not
    c. All decided on the labels as given (before any move)."""
    n_nodes = len({key.split('.')[1] for key in state if key.startswith('straggler.') and key.split('.')[1].isdigit()})
    if n_nodes == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    nearest = _straggler_distances(features, state).argmin(axis=1)
    moved = []
    for i in range(n_nodes):
        prefix = f'straggler.{i}.'
        node = {key[len(prefix):]: v for key, v in state.items() if key.startswith(prefix)}
        cluster, small = (int(v) for v in node['labels'])
        q = split_side(features, node)
        on_small = (labels == cluster) & (q.argmax(axis=1) == small) & (nearest != cluster)
        moved.append(np.flatnonzero(on_small))
    members = np.concatenate(moved)
    return members, nearest[members]


def _apply_moves(labels, prob, members, targets):
    labels = labels.copy()
    prob = prob.copy()
    for i, d in zip(members, targets):
        c = labels[i]
        prob[i, c], prob[i, d] = prob[i, d], prob[i, c]
        labels[i] = d
    return labels, prob


def move_stragglers(best, stack, opts, seed, say, dim=STRAGGLER_DIM):
    """Members of a cluster that form a small, clearly separate group on spectral features move to the
    cluster they fit.

    The EM loop leaves a few members of one molecule inside another's cluster (at 60 per molecule and SNR
    0.1 the spectral start was right and the trained network's clusters held 2-9 foreign members each,
    bench/README.md §2); the split check sees them as a second group (BIC and separation) but refuses to
    make a cluster of fewer than `min_per_cluster`. Here, for each cluster, the same test (`split_cluster`)
    with no size floor: when its smaller side is under `min_per_cluster`, each of its members goes to the
    cluster whose spectral features it lies nearest (pooled-covariance Mahalanobis distance to each
    cluster's mean, in `dim` principal components of the standardised features, fitted without the
    stragglers), if that is another cluster; it stays otherwise. The rule is stored in the model
    ('straggler.*') and `apply_splits` replays it. Returns (updated best, one info dict per cluster tested
    positive)."""
    features = spectral_features(stack)
    labels, k = best['labels'], int(best['k'])
    min_size = int(opts['min_per_cluster'])
    nodes, tests = [], []
    for c in range(k):
        members = np.flatnonzero(labels == c)
        accepted, side, node_state, info = split_cluster(features[members], opts, seed, min_size=1)
        if not accepted:
            continue
        small = int(np.argmin(np.bincount(side, minlength=2)))
        q = split_side(features[members], node_state)
        on_small = members[q.argmax(axis=1) == small]
        if len(on_small) >= min_size or len(on_small) == 0:
            continue     # two groups of a size the split check decides on: not stragglers
        nodes.append((c, small, node_state))
        tests.append({'cluster': int(c), 'members': int(len(members)), 'stragglers': int(len(on_small)),
                      'separation': info['separation']})
    if not nodes:
        return best, tests
    core = np.ones(len(labels), dtype=bool)
    for c, small, node_state in nodes:
        members = np.flatnonzero(labels == c)
        core[members[split_side(features[members], node_state).argmax(axis=1) == small]] = False
    mean, std = features.mean(axis=0), features.std(axis=0) + 1e-8
    z = _standardised(features, mean, std)
    pca = PCA(n_components=int(min(dim, z.shape[1], core.sum() - k - 1)), random_state=seed).fit(z[core])
    y = pca.transform(z)
    means = np.stack([y[core & (labels == c)].mean(axis=0) for c in range(k)])
    within = y[core] - means[labels[core]]
    covariance = within.T @ within / max(int(core.sum()) - k, 1)
    state = dict(best['state'])
    state.update({'straggler.scale.mean': torch.from_numpy(mean), 'straggler.scale.std': torch.from_numpy(std),
                  'straggler.pca.mean': torch.from_numpy(pca.mean_),
                  'straggler.pca.components': torch.from_numpy(pca.components_),
                  'straggler.means': torch.from_numpy(means),
                  'straggler.precision': torch.from_numpy(np.linalg.inv(covariance))})
    for i, (c, small, node_state) in enumerate(nodes):
        state.update({f'straggler.{i}.{key}': v for key, v in node_state.items()})
        state[f'straggler.{i}.labels'] = torch.tensor([c, small], dtype=torch.int64)
    members, targets = _straggler_moves(features, state, labels)
    for test in tests:
        mine = labels[members] == test['cluster']
        test['moved_to'] = {int(d): int(np.sum(targets[mine] == d)) for d in np.unique(targets[mine])}
    if len(members) == 0:
        say(f"stragglers: {sum(t['stragglers'] for t in tests)} members in small separate groups fit their "
            f"own cluster best: none moved")
        return best, tests
    new_labels, prob = _apply_moves(labels, best['probabilities'], members, targets)
    say(f"stragglers: {len(members)} members of small separate groups moved to the cluster their spectral "
        f"features fit (" + ', '.join(f"from {t['cluster']}: {t['moved_to']}" for t in tests if t['moved_to'])
        + ")")
    return dict(best, labels=new_labels, probabilities=prob, state=state), tests
