/*
 * Multiboot v1 front end of the KVM guest program, so that QEMU (`-kernel`)
 * boots the same guest code: a 32-bit entry that identity-maps 4 GiB with
 * 2 MiB pages, enters long mode and calls kg_mb_setup (guest/mb_setup.c).
 */
#define MB_MAGIC  0x1badb002
#define MB_FLAGS  0x00010000          /* bit 16: the address fields below are valid */

	.section .text.mb, "ax"
	.code32
	.globl kg_mb_header
	.align 4
kg_mb_header:                         /* must be in the first 8 KiB of the image */
	.long MB_MAGIC
	.long MB_FLAGS
	.long -(MB_MAGIC + MB_FLAGS)
	.long kg_mb_header            /* header_addr */
	.long __mb_load               /* load_addr: the image's first byte */
	.long __mb_load_end           /* load_end_addr: end of what the file holds */
	.long __mb_bss_end            /* bss_end_addr: the loader zeroes up to here */
	.long kg_mb_start32           /* entry_addr */

	/* eax = 0x2badb002, ebx = multiboot info, flat 32-bit segments, no paging. */
	.globl kg_mb_start32
kg_mb_start32:
	cli
	cld
	movl %ebx, %esi                     /* kept for kg_mb_setup */
	/* Zero the page tables (bss is zeroed by the loader; be sure anyway). */
	movl $kg_mb_pml4, %edi
	movl $(6 * 4096 / 4), %ecx
	xorl %eax, %eax
	rep stosl
	/* PML4[0] -> PDPT, PDPT[0..3] -> four page directories. */
	movl $kg_mb_pdpt, %eax
	orl $3, %eax
	movl %eax, kg_mb_pml4
	movl $kg_mb_pd, %eax
	orl $3, %eax
	movl $kg_mb_pdpt, %edi
	movl $4, %ecx
1:	movl %eax, (%edi)
	addl $4096, %eax
	addl $8, %edi
	loop 1b
	/* 2048 entries of 2 MiB: present, writable, PS; frame i << 21. */
	movl $kg_mb_pd, %edi
	xorl %ebx, %ebx                     /* entry index */
2:	movl %ebx, %eax
	shll $21, %eax
	orl $0x83, %eax
	movl %eax, (%edi)
	movl %ebx, %eax
	shrl $11, %eax                      /* high dword: bits 32.. of the frame */
	movl %eax, 4(%edi)
	addl $8, %edi
	incl %ebx
	cmpl $2048, %ebx
	jne 2b
	/* PAE, then CR3, EFER.LME, then paging: long mode (compatibility). */
	movl %cr4, %eax
	orl $0x20, %eax
	movl %eax, %cr4
	movl $kg_mb_pml4, %eax
	movl %eax, %cr3
	movl $0xc0000080, %ecx
	rdmsr
	orl $0x100, %eax
	wrmsr
	movl %cr0, %eax
	orl $0x80010001, %eax               /* PG, WP, PE */
	movl %eax, %cr0
	lgdt kg_mb_gdtr
	ljmp $0x08, $kg_mb_start64

	.code64
kg_mb_start64:
	movl $0x10, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss
	xorl %eax, %eax
	movl %eax, %fs
	movl %eax, %gs
	leaq kg_mb_stack_top(%rip), %rsp    /* 16-byte aligned */
	movl %esi, %edi                     /* the multiboot info address */
	call kg_mb_setup                    /* fills the mailbox, returns its address */
	movq %rax, %rsi
	xorl %edi, %edi                     /* vCPU 0 */
	leaq kg_mb_stack_top(%rip), %rsp
	call kg_entry                       /* does not return */
3:	hlt
	jmp 3b

	.section .rodata.mb, "a"
	.align 8
kg_mb_gdt:
	.quad 0
	.quad 0x00209a0000000000            /* 0x08: 64-bit code */
	.quad 0x00cf92000000ffff            /* 0x10: flat data */
kg_mb_gdtr:
	.word 3 * 8 - 1
	.long kg_mb_gdt

	.section .bss.mb, "aw", @nobits
	.align 4096
kg_mb_pml4:
	.skip 4096
kg_mb_pdpt:
	.skip 4096
kg_mb_pd:
	.skip 4 * 4096
	.align 16
	.skip 16384
kg_mb_stack_top:

	.section .note.GNU-stack, "", @progbits
