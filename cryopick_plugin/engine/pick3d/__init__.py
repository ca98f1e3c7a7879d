"""DeepETPicker — 3D picking from weak labels: label maps around particle centres (`labels`), the 3D-ResUNet
(`resunet3d`), its training (`training`), overlap-tile picking of whole tomograms (`picking`) and mean-pool NMS (`mpnms`)."""
