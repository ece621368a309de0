; vmferry x86-64 guest workload: dirties guest RAM at a rate the host sets, in the
; pattern the host chooses, and keeps a progress counter and a running checksum.
;
; Runs in 64-bit long mode at CPL3 with no IDT: it must never fault.  It talks to the
; host only through memory and one MMIO doorbell (a store to an address with no memory
; behind it, which KVM turns into an exit to the host).
;
; Registers, set by the host before the first entry (and migrated with the vCPU):
;   r15  this vCPU's mailbox slot (host -> guest parameters, offsets MB_* below)
;   r14  this vCPU's status slot  (guest -> host: counter and checksum)
;   rbx  the doorbell address
;   r13  progress counter n (pages written so far)          starts at 0
;   r12  checksum: sum of x_1 .. x_n modulo 2**64           starts at 0
;   r11  x_n, the generator: x_k = A * x_(k-1) + C mod 2**64  starts at the vCPU's seed
;   r10  TSC deadline of the next write                     starts at 0
;   r9   cursor of the sequential pattern                    starts at 0
;
; Each step k writes x_k into one 8-byte word (word k-1 mod 512) of one page of the vCPU's
; region, so the host can recompute the checksum from the counter alone.
; Doorbell values: 0 = idle (rate 0), otherwise the TSC ticks until the next write is due.

.equ MB_TICKS, 0          ; TSC ticks per page written; 0 = idle
.equ MB_BASE, 8           ; guest-physical address of the vCPU's region
.equ MB_PAGES, 16         ; pages in the region
.equ MB_HOT_PAGES, 24     ; pages in the hot set (the start of the region)
.equ MB_HOT_THRESHOLD, 32 ; a write goes to the hot set when ((x >> 24) & 255) < this
.equ MB_SEQUENTIAL, 40    ; 1: sweep the region in order instead
.equ MB_MAX_LAG, 48       ; TSC ticks of backlog kept after a stop; more is dropped
.equ ST_COUNTER, 0
.equ ST_CHECKSUM, 8
.equ LCG_A, 6364136223846793005
.equ LCG_C, 1442695040888963407

top:
    mov rcx, qword ptr [r15+MB_TICKS]
    test rcx, rcx
    jz idle
    rdtsc
    shl rdx, 32
    or rax, rdx                     ; rax = TSC now
    mov rdx, rax
    sub rdx, r10                    ; rdx = now - deadline
    js ahead                        ; ahead of the schedule: ask to sleep
    cmp rdx, qword ptr [r15+MB_MAX_LAG]
    jbe due
    mov r10, rax                    ; far behind (the vCPU was stopped): drop the backlog
due:
    add r10, rcx                    ; deadline of the next write
    mov rax, LCG_A                  ; x = A * x + C
    imul r11, rax
    mov rax, LCG_C
    add r11, rax
    cmp qword ptr [r15+MB_SEQUENTIAL], 0
    jnz sequential
    mov rcx, qword ptr [r15+MB_PAGES]
    mov rax, r11
    shr rax, 24
    and rax, 255
    cmp rax, qword ptr [r15+MB_HOT_THRESHOLD]
    jae spread
    mov rcx, qword ptr [r15+MB_HOT_PAGES]
spread:
    mov rax, r11
    shr rax, 32
    mul rcx                         ; rdx:rax = (x >> 32) * pages
    shr rax, 32                     ; page index in [0, pages)
    jmp store
sequential:
    mov rax, r9
    inc r9
    cmp r9, qword ptr [r15+MB_PAGES]
    jb store
    xor r9, r9
store:
    shl rax, 12
    add rax, qword ptr [r15+MB_BASE]
    mov rcx, r13
    and rcx, 511
    shl rcx, 3
    add rax, rcx                    ; the word of the page this step writes
    mov qword ptr [rax], r11
    add r12, r11
    inc r13
    mov qword ptr [r14+ST_COUNTER], r13
publish:                            ; stopped here, the stored checksum is one step behind
    mov qword ptr [r14+ST_CHECKSUM], r12
    jmp top
ahead:
    neg rdx                         ; ticks until the next write is due
    mov qword ptr [rbx], rdx        ; doorbell: the host lets this vCPU sleep
    jmp top
idle:
    mov qword ptr [rbx], 0          ; doorbell: nothing to do
    jmp top
