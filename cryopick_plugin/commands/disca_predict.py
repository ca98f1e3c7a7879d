"""Assign subtomograms to the clusters of a trained DISCA model.

Reads a STAR file of subtomograms (rlnImageName, same box as the training data), computes the model's
features and writes the input rows with rlnClassNumber (cluster, 1-based) and rlnAutopickFigureOfMerit
(posterior probability of that cluster).

Example:
  cryopick disca-predict more_subtomograms.star --model disca_run/disca_model.pt --out more_labels.star
"""
import logging

logger = logging.getLogger('cryopick.disca')


def add_args(parser):
    parser.add_argument('subtomograms', help='STAR file of subtomograms (rlnImageName)')
    parser.add_argument('--model', required=True, help='disca_model.pt written by `cryopick disca`')
    parser.add_argument('--out', required=True, help='output STAR file')
    parser.add_argument('--device', default=None, help="'auto', 'cpu' or 'cuda' (default $CRYOPICK_DEVICE or auto)")


def main(args):
    import numpy as np
    from cryopick_plugin.commands.disca import labelled_table, read_subtomogram_star
    from cryopick_plugin.engine.disca import model
    from cryopick_plugin.engine.io.model_io import load_model
    from cryopick_plugin.engine.io.star import write_star
    load_model(args.model, model.METHOD)  # a wrong model file fails before the subtomograms are read
    stack, table, _ = read_subtomogram_star(args.subtomograms)
    labels, prob = model.disca_predict(stack, args.model, device=args.device)
    write_star(args.out, {'particles': labelled_table(table, labels, prob)})
    logger.info('%d subtomograms assigned; cluster sizes %s', len(labels),
                np.bincount(labels, minlength=prob.shape[1]).tolist())
    return 0
