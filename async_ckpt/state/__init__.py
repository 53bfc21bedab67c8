"""The state layer: what a training state is made of, before it is staged or saved.

``flatten`` (nested dicts, lists, Stateful objects <-> flat keys), ``leaves``
(the leaf kinds and their rules), ``model`` (the descriptors a save plans
with) and ``describe`` (a flattened state -> descriptors + tensors).
"""
