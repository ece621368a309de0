"""vmferry: live migration of VMs with assigned devices and a paravirtual IOMMU."""

__version__ = "0.1.0"
