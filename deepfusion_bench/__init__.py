"""Benchmarks of the core operations and of the Prefect flow, each returning one flat
JSON-able record.

They measure; they assert nothing. The CLI (`deepfusion bench ...`) prints one line of
figures and the record, and BENCHMARKS.md quotes them with the machine they ran on. This
package sits on top of the layers, like the CLI: it may import deepfusion_core, pipeline and
flows, and none of them imports it.
"""
