"""cryopick protocols. Each module holds one protocol; classes are re-exported here for Scipion."""
from .protocol_import_coordinates import CryopickImportCoordinates3D, CryopickImportCoordinates2D  # noqa: F401
from .protocol_weak_labels import CryopickWeakLabels  # noqa: F401
from .protocol_pick3d import CryopickPick3D  # noqa: F401
from .protocol_dog_pick import CryopickDogPick  # noqa: F401
from .protocol_extract import CryopickExtractSubtomograms  # noqa: F401
from .protocol_model_import import CryopickImportModel  # noqa: F401
from .protocol_disca import CryopickDisca, CryopickDiscaPredict  # noqa: F401
from .protocol_train3d import CryopickTrain3D  # noqa: F401
from .protocol_deepcryopicker import CryopickDeepCryoPicker  # noqa: F401
from .protocol_cryosegnet import CryopickTrainCryoSegNet, CryopickCryoSegNet  # noqa: F401
from .protocol_compare import CryopickCompareCoordinates  # noqa: F401
