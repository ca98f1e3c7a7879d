"""Simulators with ground truth: tomograms (tilt series, CTF, noise, weighted back-projection), subtomograms
(CTF, missing wedge) and micrographs (ice, carbon, contamination), from density maps (`templates`) and `ctf`."""
