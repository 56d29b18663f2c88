"""The disk layer: every adapter directory functuner reads or writes goes through here.

* :mod:`.checkpoint`: writers, and the front doors ``save`` / ``load`` /
  ``convert_checkpoint`` / ``read_checkpoint`` (re-exports the reader's and
  configs' names);
* :mod:`.reader`: reading SWIFT's and PEFT's layouts with every safety check;
* :mod:`.configs`: ``adapter_config.json`` <-> functuner configs;
* :mod:`.keys`: on-disk key names (``to_disk`` / ``from_disk``);
* :mod:`.merge_shards`: streaming merge into a safetensors checkpoint;
* :mod:`.peft`: PEFT's own tuners, loaded through ``peft``.

What differs between tuners comes from the optional hooks of
:class:`functuner.tuners.base.Tuner`; nothing here imports a specific tuner.
File-system mechanics live in :mod:`functuner.core.fs`.
"""
