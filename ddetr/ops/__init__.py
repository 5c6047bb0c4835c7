"""Multi-scale deformable attention: the public function, its pure-PyTorch reference and gather twins, the layer.

Importing this package builds and loads nothing; the compiled op is built on first use.
"""

from ddetr.ops.gather import ms_deform_attn_gather
from ddetr.ops.module import MSDeformAttn
from ddetr.ops.ms_deform_attn import ms_deform_attn
from ddetr.ops.reference import ms_deform_attn_reference

__all__ = ["MSDeformAttn", "ms_deform_attn", "ms_deform_attn_gather", "ms_deform_attn_reference"]
