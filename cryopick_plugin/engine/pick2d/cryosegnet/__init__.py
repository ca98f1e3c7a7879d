"""CryoSegNet — 2D picking with an attention U-Net (`attention_unet`) trained on particle disks and picking
from its probability map (`picker`), optionally through Segment Anything's automatic mask generator (`sam`)."""
