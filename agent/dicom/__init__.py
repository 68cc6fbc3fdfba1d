"""vip-agent as a DICOM node: complete studies pushed by scanners become datasets.

Modules (each imports only those above it): ``config`` (the ``dicom:`` block),
``index`` (journal tables), ``spool`` (durable objects), ``receiver`` (pynetdicom
SCP), ``routing``, ``deid``, ``convert``, ``handover``, ``status``, ``node``
(everything together, started by ``vip-agent watch``). See docs/dicom.md.
"""
