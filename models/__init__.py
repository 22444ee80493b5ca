"""The ResNet family of He et al. 2015 ("v1") and 2016 ("v2", identity mappings), built from data tables.

    >>> from models import create_model, list_models, count_params, count_flops
    >>> net = create_model("resnet50", stride_in_1x1=False)  # torchvision's v1.5 layout
"""

from .counting import count_flops, count_params
from .registry import (
    OVERRIDABLE,
    create_model,
    get_row,
    list_models,
    register_model,
    resolve,
    unstated_layout,
)
from .zoo import ROWS

for _name, _row in ROWS.items():
    register_model(_name, _row)

__all__ = [
    "OVERRIDABLE",
    "count_flops",
    "count_params",
    "create_model",
    "get_row",
    "list_models",
    "register_model",
    "resolve",
    "unstated_layout",
]
