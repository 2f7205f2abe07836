"""fedfuse merging in any Flower app: ``FedMerge`` on the server, the uplink mods on the client.

>>> from fedfuse.flower import FedMerge, signing_mod, task_vector_mod
>>> strategy = FedMerge("ties", fraction_evaluate=0.5)      # where the ServerApp had FedAvg(...)
>>> mods = [task_vector_mod(sparsifier="trim", density=0.1)] # ClientApp(mods=mods): sparse task vectors
>>> secure = FedMerge("fisher", secure_aggregation="secagg+")  # clients: [secure_aggregation_mod, task_vector_mod()]
>>> learned = FedMerge("fedavg", coefficients=CoefficientPlan("loss", steps=20))  # clients: [coefficient_mod(loader)]
"""

from fedfuse.client.coefficient_mod import NodeModel, coefficient_mod
from fedfuse.client.mods import signing_mod, task_vector_mod
from fedfuse.client.secure_mod import secure_aggregation_mod
from fedfuse.secagg.protocol import SecAggParams
from fedfuse.server.coefficient_round import CoefficientPlan
from fedfuse.server.fedmerge import FedMerge

__all__ = [
    "CoefficientPlan",
    "FedMerge",
    "NodeModel",
    "SecAggParams",
    "coefficient_mod",
    "secure_aggregation_mod",
    "signing_mod",
    "task_vector_mod",
]
