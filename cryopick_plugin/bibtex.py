# -*- coding: utf-8 -*-
"""
@article{Liu2024DeepETPicker,
  title = {{DeepETPicker}: fast and accurate 3D particle picking for cryo-electron tomography using weakly supervised deep learning},
  author = {Liu, Guole and Niu, Tongxin and Qiu, Mengxuan and Zhu, Yun and Sun, Fei and Yang, Ge},
  journal = {Nature Communications},
  volume = {15},
  pages = {2090},
  year = {2024},
  doi = {10.1038/s41467-024-46041-0}
}

@article{Zeng2023DISCA,
  title = {High-throughput cryo-{ET} structural pattern mining by unsupervised deep iterative subtomogram clustering},
  author = {Zeng, Xiangrui and Kahng, Anson and Xue, Liang and Mahamid, Julia and Chang, Yi-Wei and Xu, Min},
  journal = {Proceedings of the National Academy of Sciences},
  volume = {120},
  number = {15},
  pages = {e2213149120},
  year = {2023},
  doi = {10.1073/pnas.2213149120}
}

@article{AlHelali2020DeepCryoPicker,
  title = {A fully-automated deep learning pipeline for cryo-{EM} image single particle picking ({DeepCryoPicker})},
  author = {Al-Azzawi, Adil and Ouadou, Anes and Max, Highsmith and Duan, Ye and Tanner, John J. and Cheng, Jianlin},
  journal = {BMC Bioinformatics},
  volume = {21},
  pages = {509},
  year = {2020},
  doi = {10.1186/s12859-020-03809-7}
}

@article{Gyawali2024CryoSegNet,
  title = {{CryoSegNet}: accurate cryo-{EM} protein particle picking by integrating the foundational {AI} image segmentation model and attention-gated {U-Net}},
  author = {Gyawali, Rajan and Dhakal, Ashwin and Wang, Liguo and Cheng, Jianlin},
  journal = {Briefings in Bioinformatics},
  volume = {25},
  number = {4},
  pages = {bbae282},
  year = {2024},
  doi = {10.1093/bib/bbae282}
}

@article{Kirillov2023SAM,
  title = {Segment Anything},
  author = {Kirillov, Alexander and Mintun, Eric and Ravi, Nikhila and Mao, Hanzi and Rolland, Chloe and Gustafson, Laura and Xiao, Tete and Whitehead, Spencer and Berg, Alexander C. and Lo, Wan-Yen and Doll{\'a}r, Piotr and Girshick, Ross},
  journal = {arXiv:2304.02643},
  year = {2023}
}
"""
