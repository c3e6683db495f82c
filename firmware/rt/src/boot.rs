//! Ring-0 boot glue (assembly only) and the ring-3 side of the ring-0 gate.
//!
//! On this platform (PVM) guest ring-0 code is *emulated* at ~1.7 M
//! instructions/s, while ring-3 code runs natively. So the ring-0 part is a
//! few hundred instructions of straight-line assembly: everything that can be
//! static data (page tables, GDT) is static data, and Rust code runs only in
//! ring 3 (with RFLAGS.IOPL=3 and user-accessible pages, so port I/O and MMIO
//! work from there; on PVM port I/O goes through the #GP handler, see below).
//!
//! BSP path (`_start`, entered per the Linux 64-bit boot protocol, RSI = the
//! boot_params "zero page"):
//!   own stack -> lgdt (+ reload CS/DS/ES/SS) -> per-CPU init (TSS + ltr,
//!   lidt, CR4.OSFXSR|OSXMMEXCPT, CR3 = static page tables, CR0.MP|NE) ->
//!   iretq to ring 3 (IOPL=3, IF=0) -> clear the IDT and write gates 0-31,
//!   the #GP gate and the DPL3 gate 0x80 (in ring 3, natively) -> zero .bss ->
//!   `__rt_bsp_main(boot_params)`. About 80 emulated instructions in all;
//!   writing the IDT in ring 0 cost ~1100 more (~0.6 ms here).
//!
//! What PVM does differently (measured): it runs guest ring 3 with the
//! hardware's IOPL=0 whatever the guest's RFLAGS.IOPL is, so `in`/`out` in
//! ring 3 raise #GP; the #GP handler here performs them (DX forms only) and
//! skips the instruction, so ring-3 code uses plain `in`/`out` everywhere
//! (direct on hardware-virtualised hosts, ~tens of us each on PVM). MMIO
//! from ring 3 (LAPIC) works directly. `int 0x80` from ring 3 raises #UD
//! instead of entering the DPL3 gate; the exception handler recognises the
//! `cd 80` bytes and serves the request the same way (see `ring0_call`).
//!
//! Device interrupts (see [`crate::irq`]): ring 3 writes the IDT gates of
//! the IRQ stubs here itself (every page is user-writable), so they cost
//! the boot nothing. A stub records its IRQ line in a pending mask and sends
//! the LAPIC EOI (six emulated instructions); ring 3 serves the device. Ring 3
//! sleeps through `ring0_call(SYS_WAIT_IRQ)`: `sti; hlt; cli` in ring 0.
//!
//! AP path: the trampoline (copied by ring-3 code to `TRAMPOLINE_ADDR`,
//! SIPI vector 0x10) goes real mode -> 32-bit protected mode -> long mode
//! with the same GDT and page tables, takes a CPU index with `lock xadd`,
//! runs the same per-CPU init and drops to ring 3 in `__rt_ap_main(index)`.
//!
//! Layout of the GDT (the first entries match the Linux boot protocol):
//!   0x08 32-bit code (AP trampoline), 0x10 64-bit kernel code, 0x18 kernel
//!   data, 0x23 user data, 0x2b 64-bit user code, 0x30 + 16*i TSS of CPU i.

use core::arch::{asm, global_asm};

/// Most CPUs the runtime supports (TSS, stacks and GDT slots are static).
pub const MAX_CPUS: usize = 64;
/// Ring-0 stack per CPU (used only by the tiny assembly handlers).
pub const KSTACK_SIZE: usize = 4096;
/// Ring-3 stack per CPU (the Rust code).
pub const USTACK_SIZE: usize = 32768;
/// Physical address the AP trampoline is copied to (SIPI vector 0x10).
pub const TRAMPOLINE_ADDR: usize = 0x10000;
/// Vector of the DPL3 interrupt gate ring 3 uses to ask ring 0 for a service.
pub const SYSCALL_VECTOR: u8 = 0x80;

/// Ring-0 services reachable with `int 0x80` (service number in RAX).
/// Returns `SYS_PING_MAGIC` in RAX.
pub const SYS_PING: u64 = 0;
/// Halt this CPU for good (`cli; hlt` in ring 0). Does not return.
pub const SYS_HALT: u64 = 1;
/// Load an empty IDT and fault: the CPU triple-faults. Does not return.
pub const SYS_TRIPLE_FAULT: u64 = 2;
/// Sleep until an interrupt arrives (`sti; hlt; cli` in ring 0), unless one was recorded in
/// the pending mask already. Returns 0. See [`crate::irq::wait`].
pub const SYS_WAIT_IRQ: u64 = 3;
/// What `SYS_PING` returns.
pub const SYS_PING_MAGIC: u64 = 0x6265_7861_7230; // "bexar0"

pub const SEL_KCODE: u16 = 0x10;
pub const SEL_KDATA: u16 = 0x18;
pub const SEL_UDATA: u16 = 0x23;
pub const SEL_UCODE: u16 = 0x2b;
pub const SEL_TSS0: u16 = 0x30;

/// Exit-port status the ring-0 exception handler reports: 0x100 + vector.
pub const EXIT_EXCEPTION_BASE: u32 = 0x100;

global_asm!(
    r#"
    .set BX_MAX_CPUS, {max_cpus}
    .set BX_KSTACK, {kstack}
    .set BX_USTACK, {ustack}
    .set BX_TRAMP, {tramp}

/* ---------------------------------------------------------------- BSP entry */
    .section .text.bexar_entry, "ax"
    .code64
    .globl _start
    .type _start, @function
_start:
    cli
    cld
    mov %rsi, %r15                      /* boot_params */
    mov $(bexar_kstacks + BX_KSTACK), %rsp
    lgdt bexar_gdtr(%rip)
    pushq $0x10
    lea 1f(%rip), %rax
    pushq %rax
    lretq
1:  mov $0x18, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    xor %eax, %eax
    mov %eax, %fs
    mov %eax, %gs

    xor %ecx, %ecx                      /* CPU index 0 */
    call bexar_r0_cpu_init

    mov %r15, %rdi
    mov $bexar_r3_bsp, %esi
    mov $(bexar_ustacks + BX_USTACK), %edx
    jmp bexar_r0_to_ring3

/* rdi = gate address, rax = handler, esi = type/attribute byte.
   Clobbers rdx, r8. */
bexar_set_gate:
    mov %rax, %rdx
    and $0xffff, %edx
    or $(0x10 << 16), %edx
    mov %rsi, %r8
    shl $40, %r8
    or %r8, %rdx
    mov %rax, %r8
    shr $16, %r8
    and $0xffff, %r8d
    shl $48, %r8
    or %r8, %rdx
    mov %rdx, (%rdi)
    mov %rax, %r8
    shr $32, %r8
    mov %r8, 8(%rdi)
    ret

/* Per-CPU init. ecx = CPU index. Sets up TSS i (RSP0 = kernel stack i),
   its GDT descriptor, ltr, lidt, CR4/CR3/CR0. Clobbers rax, rdx, rsi, rdi, r8. */
bexar_r0_cpu_init:
    mov %ecx, %eax
    shl $7, %eax
    add $bexar_tss, %rax                /* TSS i (128-byte stride) */
    xor %edx, %edx
    mov %rdx, 0(%rax)
    mov %rdx, 8(%rax)
    mov %rdx, 16(%rax)
    mov %rdx, 24(%rax)
    mov %rdx, 32(%rax)
    mov %rdx, 40(%rax)
    mov %rdx, 48(%rax)
    mov %rdx, 56(%rax)
    mov %rdx, 64(%rax)
    mov %rdx, 72(%rax)
    mov %rdx, 80(%rax)
    mov %rdx, 88(%rax)
    mov %rdx, 96(%rax)
    lea 1(%rcx), %edx
    shl $12, %edx
    add $bexar_kstacks, %rdx
    mov %rdx, 4(%rax)                   /* RSP0 */
    movw $104, 102(%rax)                /* I/O map base: none */
    mov %ecx, %edi
    shl $4, %edi
    add $0x30, %edi                     /* selector */
    lea bexar_gdt(%rdi), %rsi
    mov %rax, %rdx
    and $0xffffff, %edx
    shl $16, %rdx
    or $103, %rdx                       /* limit */
    mov $0x89, %r8d                     /* present, 64-bit TSS (available) */
    shl $40, %r8
    or %r8, %rdx
    mov %rax, %r8
    shr $24, %r8
    and $0xff, %r8d
    shl $56, %r8
    or %r8, %rdx
    mov %rdx, (%rsi)
    mov %rax, %r8
    shr $32, %r8
    mov %r8, 8(%rsi)
    ltr %di
    lidt bexar_idtr(%rip)
    mov %cr4, %rax
    or $0x620, %rax                     /* PAE | OSFXSR | OSXMMEXCPT */
    mov %rax, %cr4
    mov $bexar_pml4, %eax
    mov %rax, %cr3
    mov %cr0, %rax
    and $-13, %rax                      /* clear EM (2), TS (3) */
    or $0x22, %rax                      /* set MP (1), NE (5) */
    mov %rax, %cr0
    ret

/* rdi = argument, rsi = ring-3 RIP, rdx = ring-3 RSP. Does not return. */
bexar_r0_to_ring3:
    mov $0x23, %eax
    mov %eax, %ds
    mov %eax, %es
    pushq $0x23                         /* SS */
    pushq %rdx                          /* RSP */
    pushq $0x3002                       /* RFLAGS: IOPL=3, IF=0 */
    pushq $0x2b                         /* CS */
    pushq %rsi                          /* RIP */
    iretq

/* ---------------------------------------------------- ring-3 entry shims */
bexar_r3_bsp:
    mov %rdi, %rbx
    /* IDT, written here in ring 3 where it runs natively (its page is user-writable; the
       IDTR was loaded in ring 0): clear, then exception gates 0-31, the #GP gate that
       performs ring-3 port I/O, and the DPL3 gate 0x80. Nothing may fault before this. */
    mov $bexar_idt, %edi
    mov $512, %ecx
    xor %eax, %eax
    rep stosq
    mov $bexar_idt, %edi
    mov $bexar_isr_stubs, %eax
    mov $0x8e, %esi
    mov $32, %ecx
2:  call bexar_set_gate
    add $16, %rdi
    add $16, %rax
    dec %ecx
    jnz 2b
    mov $(bexar_idt + 16 * 13), %edi
    mov $bexar_r0_gp, %eax
    call bexar_set_gate
    mov $(bexar_idt + 16 * 0x80), %edi
    mov $bexar_r0_syscall, %eax
    mov $0xee, %esi
    call bexar_set_gate
    mov $__bss_start, %edi
    mov $__bss_end, %ecx
    sub %edi, %ecx
    xor %eax, %eax
    rep stosb
    mov %rbx, %rdi
    and $-16, %rsp
    call {bsp_main}
    ud2

bexar_r3_ap:
    and $-16, %rsp
    call {ap_main}
    ud2

/* ------------------------------------------------ ring-0 gate (int 0x80) */
/* rax = service. */
bexar_r0_syscall:
    test %rax, %rax
    jz 1f
    cmp $1, %rax
    je bexar_r0_halt
    cmp $2, %rax
    je bexar_r0_triple_fault
    cmp $3, %rax
    je 2f
    mov $-1, %rax
    iretq
1:  mov ${ping_magic}, %rax
    iretq
2:  call bexar_r0_wait_irq
    iretq

/* SYS_WAIT_IRQ, called with IF=0: unless an interrupt was recorded since ring 3 last took the
   pending mask, sleep until one arrives. `sti; hlt`: the sti shadow covers the hlt, so an
   interrupt already pending wakes it instead of being taken before it. The handler (below)
   runs on this stack and returns after the hlt. Returns rax = 0. */
bexar_r0_wait_irq:
    xor %eax, %eax
    cmpl $0, bexar_irq_pending(%rip)
    jne 1f
    sti
    hlt
    cli
1:  ret

bexar_r0_halt:
    cli
1:  hlt
    jmp 1b

bexar_r0_triple_fault:
    lea bexar_msg_tf(%rip), %rsi
    call bexar_r0_puts
    lidt bexar_null_idtr(%rip)
    ud2
    xor %ecx, %ecx
    div %ecx
    jmp bexar_r0_halt

/* -------------------------------------------------- exception handlers */
    .balign 16
bexar_isr_stubs:
    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .balign 16
    .if (\v == 8) || (\v == 10) || (\v == 11) || (\v == 12) || (\v == 13) || (\v == 14) || (\v == 17) || (\v == 21) || (\v == 29) || (\v == 30)
    pushq $\v
    .else
    pushq $0
    pushq $\v
    .endif
    jmp bexar_r0_exception
    .endr

/* #GP. PVM runs guest ring 3 with the hardware's IOPL=0 whatever the guest
   RFLAGS.IOPL says, so `in`/`out` in ring 3 raise #GP: perform the access
   here (only the DX forms: EC/ED/EE/EF, 66 ED/EF) and skip the instruction.
   Anything else goes to the generic handler. Stack: error, rip, cs, ... */
bexar_r0_gp:
    testb $3, 16(%rsp)
    jz 9f
    push %rcx
    push %rsi
    mov 24(%rsp), %rsi                  /* rip */
    movzbl (%rsi), %ecx
    cmp $0xee, %ecx
    je 1f
    cmp $0xec, %ecx
    je 2f
    cmp $0xef, %ecx
    je 3f
    cmp $0xed, %ecx
    je 4f
    cmp $0x66, %ecx
    jne 8f
    movzbl 1(%rsi), %ecx
    cmp $0xef, %ecx
    je 5f
    cmp $0xed, %ecx
    je 6f
    jmp 8f
1:  outb %al, %dx
    mov $1, %ecx
    jmp 7f
2:  inb %dx, %al
    mov $1, %ecx
    jmp 7f
3:  outl %eax, %dx
    mov $1, %ecx
    jmp 7f
4:  inl %dx, %eax
    mov $1, %ecx
    jmp 7f
5:  outw %ax, %dx
    mov $2, %ecx
    jmp 7f
6:  inw %dx, %ax
    mov $2, %ecx
7:  add %rcx, 24(%rsp)
    pop %rsi
    pop %rcx
    add $8, %rsp                        /* error code */
    iretq
8:  pop %rsi
    pop %rcx
9:  pushq $13
    jmp bexar_r0_exception

/* stack: vector, error code, rip, cs, rflags, rsp, ss */
bexar_r0_exception:
    pushq %rax                          /* 0: rax, 8: vector, 16: error, 24: rip, 32: cs */
    testb $3, 32(%rsp)
    jz 2f
    cmpq $6, 8(%rsp)                    /* #UD or #GP only: RIP is valid code */
    je 1f
    cmpq $13, 8(%rsp)
    jne 2f
1:    /* From ring 3: was it our `int 0x80`? (PVM raises #UD for `int n` from
       ring 3 instead of using the DPL3 gate.) Then serve it here. */
    mov 24(%rsp), %rdx
    cmpw $0x80cd, (%rdx)
    jne 2f
    lock incl bexar_int80_fallbacks(%rip)
    mov (%rsp), %rax
    cmp $1, %rax
    je bexar_r0_halt
    cmp $2, %rax
    je bexar_r0_triple_fault
    cmp $3, %rax
    jne 4f
    call bexar_r0_wait_irq
    jmp 3f
4:  test %rax, %rax
    mov $-1, %rax
    jnz 3f
    mov ${ping_magic}, %rax
3:  addq $2, 24(%rsp)                   /* skip the int 0x80 */
    add $24, %rsp                       /* rax, vector, error code */
    iretq
2:  lea bexar_msg_exc(%rip), %rsi
    call bexar_r0_puts
    mov 8(%rsp), %rax
    call bexar_r0_puthex
    lea bexar_msg_err(%rip), %rsi
    call bexar_r0_puts
    mov 16(%rsp), %rax
    call bexar_r0_puthex
    lea bexar_msg_rip(%rip), %rsi
    call bexar_r0_puts
    mov 24(%rsp), %rax
    call bexar_r0_puthex
    lea bexar_msg_cs(%rip), %rsi
    call bexar_r0_puts
    mov 32(%rsp), %rax
    call bexar_r0_puthex
    lea bexar_msg_rsp(%rip), %rsi
    call bexar_r0_puts
    mov 48(%rsp), %rax
    call bexar_r0_puthex
    lea bexar_msg_cr2(%rip), %rsi
    call bexar_r0_puts
    mov %cr2, %rax
    call bexar_r0_puthex
    lea bexar_msg_tr(%rip), %rsi
    call bexar_r0_puts
    xor %eax, %eax
    str %ax
    call bexar_r0_puthex
    mov $10, %eax
    call bexar_r0_putc
    mov 8(%rsp), %eax
    add ${exc_base}, %eax
    mov $0xf4, %edx
    out %eax, %dx
    jmp bexar_r0_halt

/* Device interrupts (gates installed from ring 3 by `irq::route_isa_irq`): one stub per IOAPIC
   pin 0-23 (the ISA IRQs 0-15, then the GSIs up to 23 that virtio-mmio devices use). Each records
   its line in bexar_irq_pending and signals EOI to the local APIC
   (xAPIC MMIO at 0xfee00000); the device itself is served from ring 3. Six instructions, as
   ring 0 is emulated on PVM. */
    .irp p, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23
bexar_irq_stub_\p:
    lock orl $(1 << \p), bexar_irq_pending(%rip)
    push %rax
    mov $0xfee000b0, %eax
    movl $0, (%rax)
    pop %rax
    iretq
    .endr

/* The local APIC's spurious vector: no EOI. */
    .globl bexar_irq_spurious
bexar_irq_spurious:
    iretq

/* Polled COM1 output from ring 0. al = byte. Clobbers rdx. */
bexar_r0_putc:
    push %rax
    push %rcx
    mov $0x3fd, %edx
    mov $100000, %ecx
1:  inb %dx, %al
    test $0x20, %al
    jnz 2f
    dec %ecx
    jnz 1b
2:  pop %rcx
    pop %rax
    mov $0x3f8, %edx
    outb %al, %dx
    ret

/* rsi = NUL-terminated string. Clobbers rax, rdx, rsi. */
bexar_r0_puts:
1:  movzbl (%rsi), %eax
    test %eax, %eax
    jz 2f
    call bexar_r0_putc
    inc %rsi
    jmp 1b
2:  ret

/* rax = value, printed as 0x + 16 hex digits. Clobbers rax, rcx, rdx, r8. */
bexar_r0_puthex:
    mov %rax, %r8
    mov $0x30, %eax
    call bexar_r0_putc
    mov $0x78, %eax
    call bexar_r0_putc
    mov $16, %ecx
1:  rol $4, %r8
    mov %r8d, %eax
    and $0xf, %eax
    cmp $10, %eax
    jb 2f
    add $39, %eax                       /* 'a' - '0' - 10 */
2:  add $0x30, %eax
    call bexar_r0_putc
    dec %ecx
    jnz 1b
    ret

/* ------------------------------------------------- AP trampoline (copied) */
    .balign 16
    .globl bexar_trampoline_start
    .globl bexar_trampoline_end
bexar_trampoline_start:
    .code16
    cli
    cld
    mov %cs, %ax
    mov %ax, %ds
    lgdtl bexar_tramp_gdtr - bexar_trampoline_start
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmpl $0x08, $(bexar_tramp32 - bexar_trampoline_start + BX_TRAMP)
    .code32
bexar_tramp32:
    mov $0x18, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov %cr4, %eax
    or $0x620, %eax                     /* PAE | OSFXSR | OSXMMEXCPT */
    mov %eax, %cr4
    mov $bexar_pml4, %eax
    mov %eax, %cr3
    mov $0xc0000080, %ecx               /* EFER.LME */
    rdmsr
    or $0x100, %eax
    wrmsr
    mov %cr0, %eax
    or $0x80000000, %eax                /* PG */
    mov %eax, %cr0
    ljmp $0x10, $bexar_ap_entry64
    .balign 8
bexar_tramp_gdtr:
    .word bexar_gdt_end - bexar_gdt - 1
    .long bexar_gdt
bexar_trampoline_end:
    .code64

bexar_ap_entry64:
    mov $0x18, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    xor %eax, %eax
    mov %eax, %fs
    mov %eax, %gs
    mov $1, %ecx
    lock xadd %ecx, bexar_ap_next(%rip)
    cmp $BX_MAX_CPUS, %ecx
    jae bexar_r0_halt
    lea 1(%rcx), %eax
    shl $12, %eax
    add $bexar_kstacks, %rax
    mov %rax, %rsp
    push %rcx
    call bexar_r0_cpu_init
    pop %rcx
    mov %ecx, %edi
    mov $bexar_r3_ap, %esi
    lea 1(%rcx), %edx
    shl $15, %edx
    add $bexar_ustacks, %rdx
    jmp bexar_r0_to_ring3

/* ------------------------------------------------------------- data */
    .section .rodata.bexar_msgs, "a"
bexar_msg_exc:      .asciz "bexar-rt: FAIL cpu exception: vector="
bexar_msg_err:      .asciz " error="
bexar_msg_rip:      .asciz " rip="
bexar_msg_cs:       .asciz " cs="
bexar_msg_rsp:      .asciz " rsp="
bexar_msg_cr2:      .asciz " cr2="
bexar_msg_tr:       .asciz " tr="
bexar_msg_tf:       .asciz "bexar-rt: ring 0: triple fault requested, loading an empty IDT and faulting\n"

    .section .data.bexar_gdt, "aw"
    .balign 16
    .globl bexar_gdt
bexar_gdt:
    .quad 0
    .quad 0x00cf9b000000ffff            /* 0x08 32-bit code (AP trampoline) */
    .quad 0x00af9b000000ffff            /* 0x10 64-bit kernel code */
    .quad 0x00cf93000000ffff            /* 0x18 kernel data */
    .quad 0x00cff3000000ffff            /* 0x20 user data (DPL3) */
    .quad 0x00affb000000ffff            /* 0x28 64-bit user code (DPL3) */
    .fill BX_MAX_CPUS * 2, 8, 0         /* 0x30 + 16*i: TSS of CPU i */
bexar_gdt_end:
    .balign 8
    .word 0, 0, 0
bexar_gdtr:
    .word bexar_gdt_end - bexar_gdt - 1
    .quad bexar_gdt
    .word 0, 0, 0
bexar_idtr:
    .word 4095
    .quad bexar_idt
    .word 0, 0, 0
bexar_null_idtr:
    .word 0
    .quad 0
    .balign 4
    .globl bexar_ap_next
bexar_ap_next:
    .long 1                             /* next AP's CPU index */
    .globl bexar_int80_fallbacks
bexar_int80_fallbacks:
    .long 0                             /* int 0x80 served by the #UD/#GP path */
    .globl bexar_irq_pending
bexar_irq_pending:
    .long 0                             /* bit n: IRQ line n interrupted (set in ring 0) */
    .balign 8
    .globl bexar_irq_stubs
bexar_irq_stubs:                        /* handler address per IOAPIC pin */
    .irp p, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23
    .quad bexar_irq_stub_\p
    .endr

/* Static page tables: identity map of 0-4 GiB with 2 MiB pages, all
   user-accessible (U/S=1) and writable; 0xd0000000-0xffffffff (MMIO:
   IOAPIC, LAPIC, ...) uncached (PCD|PWT). */
    .section .data.bexar_pagetables, "aw"
    .balign 4096
    .globl bexar_pml4
bexar_pml4:
    .quad bexar_pdpt + 0x7
    .fill 511, 8, 0
bexar_pdpt:
    .quad bexar_pd + 0x7
    .quad bexar_pd + 0x1000 + 0x7
    .quad bexar_pd + 0x2000 + 0x7
    .quad bexar_pd + 0x3000 + 0x7
    .fill 508, 8, 0
bexar_pd:
    .set bx_pgaddr, 0
    .rept 2048
    .if bx_pgaddr >= 0xd0000000
    .quad bx_pgaddr + 0x9f
    .else
    .quad bx_pgaddr + 0x87
    .endif
    .set bx_pgaddr, bx_pgaddr + 0x200000
    .endr

/* Not zeroed by anyone before use: written by the ring-0 code above. */
    .section .bss_bexar, "aw", @nobits
    .balign 4096
    .globl bexar_idt
bexar_idt:
    .skip 4096
    .globl bexar_tss
bexar_tss:
    .skip 128 * BX_MAX_CPUS
    .balign 4096
bexar_kstacks:
    .skip BX_KSTACK * BX_MAX_CPUS
    .balign 4096
bexar_ustacks:
    .skip BX_USTACK * BX_MAX_CPUS

    .text
"#,
    max_cpus = const MAX_CPUS,
    kstack = const KSTACK_SIZE,
    ustack = const USTACK_SIZE,
    tramp = const TRAMPOLINE_ADDR,
    ping_magic = const SYS_PING_MAGIC,
    exc_base = const EXIT_EXCEPTION_BASE,
    bsp_main = sym crate::__rt_bsp_main,
    ap_main = sym crate::__rt_ap_main,
    options(att_syntax)
);

unsafe extern "C" {
    static bexar_trampoline_start: u8;
    static bexar_trampoline_end: u8;
    static bexar_ap_next: core::sync::atomic::AtomicU32;
    static bexar_int80_fallbacks: core::sync::atomic::AtomicU32;
    pub(crate) static bexar_irq_pending: core::sync::atomic::AtomicU32;
    pub(crate) static bexar_irq_stubs: [u64; crate::irq::LINES];
    pub(crate) static bexar_irq_spurious: u8;
    pub(crate) static mut bexar_idt: [u64; 512];
}

/// The AP trampoline image (to be copied to [`TRAMPOLINE_ADDR`]).
pub fn trampoline() -> &'static [u8] {
    unsafe {
        let start = &raw const bexar_trampoline_start;
        let end = &raw const bexar_trampoline_end;
        core::slice::from_raw_parts(start, end as usize - start as usize)
    }
}

/// How many APs have entered long mode so far (they take CPU indices
/// 1, 2, ... in arrival order).
pub fn aps_arrived() -> u32 {
    unsafe { bexar_ap_next.load(core::sync::atomic::Ordering::Acquire) - 1 }
}

/// How many `int 0x80` ring-0 calls were served by the exception handler
/// because the platform raised #UD/#GP instead of using the DPL3 gate
/// (PVM does that).
pub fn int80_fallbacks() -> u32 {
    unsafe { bexar_int80_fallbacks.load(core::sync::atomic::Ordering::Relaxed) }
}

/// Ask ring 0 for a service through the DPL3 gate at [`SYSCALL_VECTOR`].
/// If the platform does not deliver `int 0x80` from ring 3 and raises an
/// exception instead (PVM), the ring-0 exception handler recognises the
/// instruction and serves the same services.
pub fn ring0_call(service: u64) -> u64 {
    let ret: u64;
    unsafe {
        // The gate path changes only RAX; the #UD/#GP fallback also RDX.
        asm!("int 0x80", inlateout("rax") service => ret, out("rdx") _, options(nostack));
    }
    ret
}

/// Stop this CPU for good (ring-0 `hlt` with interrupts off).
pub fn halt() -> ! {
    ring0_call(SYS_HALT);
    loop {
        core::hint::spin_loop();
    }
}

/// Triple-fault the CPU (the VMM sees a shutdown / triple fault).
pub fn triple_fault() -> ! {
    ring0_call(SYS_TRIPLE_FAULT);
    loop {
        core::hint::spin_loop();
    }
}
