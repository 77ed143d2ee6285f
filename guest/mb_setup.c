/*
 * Multiboot boot of the KVM guest program (under QEMU, no VMM to fill the
 * mailbox): lays out the mailbox, table and working set as vmm/kvm_boot.c
 * does, for 1 vCPU, from the kernel command line, and measures the TSC.
 */
#include "abi.h"

/* The first fields of the multiboot v1 information structure. */
struct mb_info {
	uint32_t flags;          /* bit 0: mem_*; bit 2: cmdline */
	uint32_t mem_lower;      /* KiB below 1 MiB */
	uint32_t mem_upper;      /* KiB above 1 MiB */
	uint32_t boot_device;
	uint32_t cmdline;        /* physical address of a NUL-terminated string */
};

#define DEFAULT_WS    (UINT64_C(4) << 20)
#define DEFAULT_RATE  (UINT64_C(4) << 20)    /* bytes/s */
#define PIT_HZ        UINT64_C(1193182)
#define CAL_MS        50

uint64_t kg_mb_setup(uint32_t mbi_addr);

static inline void outb(uint16_t port, uint8_t v)
{
	__asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port) : "memory");
}

static inline uint8_t inb(uint16_t port)
{
	uint8_t v;

	__asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port) : "memory");
	return v;
}

static inline uint64_t rdtsc(void)
{
	uint32_t lo, hi;

	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return lo | (uint64_t)hi << 32;
}

static void puts_e9(const char *s)
{
	while (*s)
		outb(KG_PORT_CONSOLE, (uint8_t)*s++);
}

static void putu_e9(uint64_t v)
{
	char tmp[21];
	int n = 0;

	do {
		tmp[n++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	while (n)
		outb(KG_PORT_CONSOLE, (uint8_t)tmp[--n]);
}

/* "NAME=VALUE" anywhere in the command line (QEMU prefixes the kernel's
 * file name), VALUE a number with an optional K, M or G suffix. */
static int cmdline_size(const char *s, const char *name, uint64_t *out)
{
	while (s && *s) {
		const char *n = name, *p = s;

		while (*n && *p == *n) {
			n++;
			p++;
		}
		if (!*n && *p == '=' && p[1] >= '0' && p[1] <= '9') {
			uint64_t v = 0;

			for (p++; *p >= '0' && *p <= '9'; p++)
				v = v * 10 + (uint64_t)(*p - '0');
			if (*p == 'k' || *p == 'K')
				v <<= 10;
			else if (*p == 'm' || *p == 'M')
				v <<= 20;
			else if (*p == 'g' || *p == 'G')
				v <<= 30;
			*out = v;
			return 1;
		}
		while (*s && *s != ' ')
			s++;
		while (*s == ' ')
			s++;
	}
	return 0;
}

/* TSC ticks over CAL_MS of PIT channel 2 (mode 0, gate on, speaker off), as
 * Linux's pit_calibrate_tsc does; 0 if the PIT never fires. */
static uint64_t tsc_khz_by_pit(void)
{
	uint32_t latch = (uint32_t)(PIT_HZ * CAL_MS / 1000);
	uint64_t t0, t1, spins = 0;

	outb(0x61, (uint8_t)((inb(0x61) & ~0x02) | 0x01));
	outb(0x43, 0xb0);
	outb(0x42, (uint8_t)(latch & 0xff));
	outb(0x42, (uint8_t)(latch >> 8));
	t0 = rdtsc();
	while (!(inb(0x61) & 0x20))
		if (++spins > UINT64_C(100000000))
			return 0;
	t1 = rdtsc();
	return (t1 - t0) / CAL_MS;
}

uint64_t kg_mb_setup(uint32_t mbi_addr)
{
	const struct mb_info *mbi = (const struct mb_info *)(uint64_t)mbi_addr;
	const char *cmd = (mbi->flags & 4) ? (const char *)(uint64_t)mbi->cmdline : 0;
	struct kg_mailbox *mb = (struct kg_mailbox *)KG_MAILBOX_GPA;
	uint64_t ram = (mbi->flags & 1) ? (UINT64_C(1) << 20) + (uint64_t)mbi->mem_upper * 1024
					: UINT64_C(64) << 20;
	uint64_t ws = DEFAULT_WS, rate = DEFAULT_RATE, hb = 0, room, pages, table;
	uint64_t *p, n;

	cmdline_size(cmd, "ws", &ws);
	cmdline_size(cmd, "rate", &rate);
	cmdline_size(cmd, "hb", &hb);      /* heartbeat period, microseconds; 0: none */
	room = ram > KG_TABLE_GPA + 2 * KG_PAGE_SIZE ? ram - KG_TABLE_GPA : 2 * KG_PAGE_SIZE;
	pages = ws / KG_PAGE_SIZE;
	if (pages < 1)
		pages = 1;
	for (;;) {
		table = (pages * 8 + KG_PAGE_SIZE - 1) & ~(KG_PAGE_SIZE - 1);
		if (table + pages * KG_PAGE_SIZE <= room || pages == 1)
			break;
		pages = (room - table) / KG_PAGE_SIZE;
	}
	/* Generation 0 is a zero page: clear what the firmware may have used. */
	for (p = (uint64_t *)KG_TABLE_GPA, n = (table + pages * KG_PAGE_SIZE) / 8; n; n--)
		*p++ = 0;
	for (p = (uint64_t *)mb, n = KG_PAGE_SIZE / 8; n; n--)
		*p++ = 0;
	mb->magic = KG_MAGIC;
	mb->version = KG_ABI_VERSION;
	mb->nvcpus = 1;
	mb->table_gpa = KG_TABLE_GPA;
	mb->ws_gpa = KG_TABLE_GPA + table;
	mb->ws_pages = pages;
	for (unsigned i = 0; i < KG_MAX_VCPUS; i++) {
		mb->vcpu[i].inflight_page = KG_NONE;
		mb->vcpu[i].check_first_bad = KG_NONE;
	}
	mb->tsc_khz = tsc_khz_by_pit();
	mb->rate_pages = rate / KG_PAGE_SIZE;
	mb->heartbeat_us = hb;
	puts_e9("multiboot: ");
	putu_e9(ram >> 20);
	puts_e9(" MiB RAM, working set ");
	putu_e9(pages);
	puts_e9(" pages at ");
	putu_e9(mb->ws_gpa);
	puts_e9(", rate ");
	putu_e9(mb->rate_pages);
	puts_e9(" pages/s, tsc ");
	putu_e9(mb->tsc_khz);
	puts_e9(mb->tsc_khz ? " kHz\n" : " kHz (PIT calibration failed: guest idles)\n");
	return KG_MAILBOX_GPA;
}
