/*
 * The KVM probe guest: a 64 KiB BIOS image that takes the CPU from the reset vector through
 * protected mode and paging into 64-bit long mode, then writes 0x21 to the isa-debug-exit port
 * (0xf4), so QEMU exits with status (0x21 << 1) | 1 = 67. Each stage prints one letter on COM1
 * (R: real mode, P: protected mode, L: long mode) so a hang says how far the guest got.
 *
 * A stock Linux kernel makes the same transitions early in boot; a KVM that cannot run them
 * (e.g. a nested PVM host that only runs specially built guests) hangs here in milliseconds
 * instead of minutes into a real boot.
 *
 * orchestrator/hostcaps.py embeds the bytes; tests/unit/test_hostcaps.py re-assembles this file
 * and compares:
 *   as --32 -o probe.o kvmprobe.S && objcopy -O binary probe.o probe.bin
 */
    .code16
    .globl _start
_start:
    cli
    mov $0x3f8, %dx
    mov $'R', %al
    out %al, %dx
    xor %ax, %ax
    mov %ax, %ds
    lgdtl %cs:gdt_desc
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmpl $0x08, $(pm32 + 0xF0000)
    .code32
pm32:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov $0x3f8, %dx
    mov $'P', %al
    out %al, %dx
    /* identity-map the first 2 MiB: PML4 at 0x1000, PDPT at 0x2000, PD at 0x3000 */
    mov $0x1000, %edi
    xor %eax, %eax
    mov $0x3000, %ecx
    rep stosb
    movl $0x2003, 0x1000
    movl $0x3003, 0x2000
    movl $0x83, 0x3000
    mov $0x1000, %eax
    mov %eax, %cr3
    mov %cr4, %eax
    or $0x20, %eax          /* PAE */
    mov %eax, %cr4
    mov $0xC0000080, %ecx   /* EFER.LME */
    rdmsr
    or $0x100, %eax
    wrmsr
    mov %cr0, %eax
    or $0x80000000, %eax    /* PG */
    mov %eax, %cr0
    ljmp $0x18, $(lm64 + 0xF0000)
    .code64
lm64:
    mov $0x3f8, %dx
    mov $'L', %al
    out %al, %dx
    mov $0x21, %al
    out %al, $0xf4
1:  hlt
    jmp 1b
    .p2align 3
gdt:
    .quad 0
    .quad 0x00CF9A000000FFFF    /* 0x08: 32-bit code */
    .quad 0x00CF92000000FFFF    /* 0x10: data */
    .quad 0x00AF9A000000FFFF    /* 0x18: 64-bit code */
gdt_end:
gdt_desc:
    .word gdt_end - gdt - 1
    .long gdt + 0xF0000
    .org 0xFFF0, 0xf4
    .code16
    ljmp $0xf000, $_start       /* the reset vector */
    .org 0x10000, 0xf4
