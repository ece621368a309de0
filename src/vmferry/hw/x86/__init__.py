"""x86-64 under Linux KVM: the ioctl wrapper (:mod:`.kvm`), long-mode set-up
(:mod:`.longmode`) and the migrated vCPU state layout (:mod:`.state`)."""
