"""nerofy: turn a PyTorch model into a balanced network trained by Nero.

Public API::

    model, optimizer = nerofy.wrap(model, lr=0.01)      # plan + rewrite in place + matching Nero
    plan = nerofy.plan(model, example_inputs=None)      # inspect; plan.override(...); wrap(model, plan=plan)
    nerofy.bake(model)                                  # plain module again, same outputs
    nerofy.export_state_dict(model)                     # the plain state_dict, model left wrapped
    nerofy.param_groups(model)                          # wrap's Nero groups again (after FSDP2, in hooks)
    nerofy.Nero(params, lr=0.01, beta=0.999)            # the optimizer on its own
    nerofy.register_timm()                              # timm.optim.create_optimizer_v2(model, "nero")
    nerofy.wrap(trained, keep="function")               # trained weights: the same outputs at wrap
    nerofy.reestimate_bn(model, batches)                # BatchNorm statistics measured again
    nerofy.example_inputs(hf_model)                     # inputs for any transformers model (nerofy.hf)
"""
from .balanced import Balanced, balance, is_balanced
from .export import export_state_dict
from .hf import example_inputs  # transformers is imported on the first call, never here
from .integrations import register_timm
from .layout import NeuronLayout
from .optim import Nero
from .plan import ROLES, Entry, Plan
from .rewrite import bake, is_wrapped, param_groups, plan, wrap
from .scale import calibrate_
from .trained import KEEP_MODES, reestimate_bn

__version__ = "0.1.0"

__all__ = ["wrap", "plan", "bake", "Nero", "Plan", "Entry", "ROLES", "NeuronLayout", "Balanced", "balance",
           "is_balanced", "is_wrapped", "calibrate_", "export_state_dict", "param_groups", "register_timm",
           "reestimate_bn", "KEEP_MODES", "example_inputs",
           "__version__"]
