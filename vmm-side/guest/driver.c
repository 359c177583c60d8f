/* hostmem's guest driver: a freestanding virtio-gpu driver that runs in the KVM guest, in
 * ring 3 (IOPL 3 for port I/O), with no interrupts: it polls the used ring.
 *
 * It finds the GPU by PCI config space (mechanism #1, ports 0xCF8/0xCFC), walks the virtio
 * capabilities (common, notify, ISR, device config, shared memory region 1 = the hostmem
 * window), negotiates VERSION_1 | VIRGL | RESOURCE_BLOB | CONTEXT_INIT, sets up the controlq
 * and the cursorq in its own memory, then runs the workload the VMM put in `struct params`:
 * GET_CAPSET_INFO, CTX_CREATE, and per blob RESOURCE_CREATE_BLOB, SUBMIT_3D (FILL),
 * RESOURCE_MAP_BLOB, a check of every byte through the window at the BAR address, a guest
 * write checked by the device (SUBMIT_3D CHECKSUM), RESOURCE_UNMAP_BLOB (the range must
 * read zeros afterwards) and RESOURCE_UNREF, batched so that many commands are in flight.
 * Then the display: a filled blob shown on scanout 0 (SET_SCANOUT_BLOB, RESOURCE_FLUSH), a
 * test pattern through a 2D resource on scanout 0, and a cursor (UPDATE_CURSOR, MOVE_CURSOR
 * on the cursorq); the VMM checks each against what it knows of the seed.
 *
 * Built by vmm-side/build.rs with gcc (-ffreestanding -nostdlib, guest.ld), loaded as a flat
 * image at IMAGE_GPA. ABI with the VMM: abi.h.
 */
#include <stdint.h>
#include <stddef.h>
#include "abi.h"

typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;

#define barrier() __asm__ volatile("" ::: "memory")

static volatile struct params *const P = (volatile struct params *)PARAMS_GPA;
static volatile struct results *const R = (volatile struct results *)RESULTS_GPA;

/* ---- port I/O, TSC, events ---- */

static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" ::"a"(v), "Nd"(port)); }
static inline u32 inl(u16 port)
{
    u32 v;
    __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}
static inline u64 rdtsc(void)
{
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}

static void event(u32 code, u64 arg)
{
    R->event_arg = arg;
    R->tsc_end = rdtsc(); /* the VMM's clock at this exit converts ticks to time */
    barrier();
    outl(EVENT_PORT, code);
    barrier();
}

static void copy_msg(const char *s)
{
    int i = 0;
    for (; s[i] && i < 255; i++)
        R->message[i] = s[i];
    R->message[i] = 0;
}

static void fatal(const char *why)
{
    copy_msg(why);
    R->tsc_end = rdtsc();
    for (;;)
        event(EV_FATAL, 0);
}

/* gcc may call these itself, even freestanding. */
void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *src, size_t n);
void *memset(void *d, int c, size_t n)
{
    volatile u8 *p = d;
    while (n--)
        *p++ = (u8)c;
    return d;
}
void *memcpy(void *d, const void *src, size_t n)
{
    volatile u8 *p = d;
    const volatile u8 *q = src;
    while (n--)
        *p++ = *q++;
    return d;
}

/* ---- PCI config space ---- */

static u32 cfg_addr(u32 dev, u32 off) { return 0x80000000u | (dev << 11) | (off & 0xfc); }
static u32 cfg_read32(u32 dev, u32 off)
{
    outl(0xCF8, cfg_addr(dev, off));
    return inl(0xCFC);
}
static void cfg_write32(u32 dev, u32 off, u32 v)
{
    outl(0xCF8, cfg_addr(dev, off));
    outl(0xCFC, v);
}
static u8 cfg_read8(u32 dev, u32 off) { return (u8)(cfg_read32(dev, off) >> (8 * (off & 3))); }

/* ---- virtio constants ---- */

#define VIRTIO_PCI_CAP_COMMON_CFG 1
#define VIRTIO_PCI_CAP_NOTIFY_CFG 2
#define VIRTIO_PCI_CAP_ISR_CFG 3
#define VIRTIO_PCI_CAP_DEVICE_CFG 4
#define VIRTIO_PCI_CAP_SHARED_MEMORY_CFG 8
#define VIRTIO_GPU_SHM_ID_HOST_VISIBLE 1

#define S_ACKNOWLEDGE 1
#define S_DRIVER 2
#define S_DRIVER_OK 4
#define S_FEATURES_OK 8
#define S_NEEDS_RESET 0x40
#define S_FAILED 0x80

#define F_VIRGL (1ull << 0)
#define F_RESOURCE_BLOB (1ull << 3)
#define F_CONTEXT_INIT (1ull << 4)
#define F_VERSION_1 (1ull << 32)

/* struct virtio_pci_common_cfg offsets */
#define CC_DFSELECT 0x00
#define CC_DF 0x04
#define CC_GFSELECT 0x08
#define CC_GF 0x0c
#define CC_NUM_QUEUES 0x12
#define CC_STATUS 0x14
#define CC_Q_SELECT 0x16
#define CC_Q_SIZE 0x18
#define CC_Q_ENABLE 0x1c
#define CC_Q_NOFF 0x1e
#define CC_Q_DESC 0x20
#define CC_Q_AVAIL 0x28
#define CC_Q_USED 0x30

#define VIRTIO_GPU_CMD_RESOURCE_CREATE_2D 0x0101
#define VIRTIO_GPU_CMD_RESOURCE_UNREF 0x0102
#define VIRTIO_GPU_CMD_SET_SCANOUT 0x0103
#define VIRTIO_GPU_CMD_RESOURCE_FLUSH 0x0104
#define VIRTIO_GPU_CMD_TRANSFER_TO_HOST_2D 0x0105
#define VIRTIO_GPU_CMD_RESOURCE_ATTACH_BACKING 0x0106
#define VIRTIO_GPU_FORMAT_B8G8R8A8_UNORM 1
#define VIRTIO_GPU_FORMAT_B8G8R8X8_UNORM 2
#define VIRTIO_GPU_CMD_SET_SCANOUT_BLOB 0x010d
#define VIRTIO_GPU_CMD_UPDATE_CURSOR 0x0300
#define VIRTIO_GPU_CMD_MOVE_CURSOR 0x0301
#define VIRTIO_GPU_CMD_GET_CAPSET_INFO 0x0108
#define VIRTIO_GPU_CMD_RESOURCE_CREATE_BLOB 0x010c
#define VIRTIO_GPU_CMD_CTX_CREATE 0x0200
#define VIRTIO_GPU_CMD_SUBMIT_3D 0x0207
#define VIRTIO_GPU_CMD_RESOURCE_MAP_BLOB 0x0208
#define VIRTIO_GPU_CMD_RESOURCE_UNMAP_BLOB 0x0209
#define VIRTIO_GPU_RESP_OK_NODATA 0x1100
#define VIRTIO_GPU_RESP_OK_CAPSET_INFO 0x1102
#define VIRTIO_GPU_RESP_OK_MAP_INFO 0x1106
#define VIRTIO_GPU_BLOB_MEM_HOST3D 2
#define VIRTIO_GPU_BLOB_FLAG_USE_MAPPABLE 1
#define VIRTIO_GPU_CONTEXT_INIT_CAPSET_ID_MASK 0xff

/* The shm backend's stream ops (device/src/backend/shm.rs). */
#define OP_FILL 1
#define OP_CHECKSUM 3

/* ---- the device as found ---- */

static u32 gpu_dev;
static volatile u8 *common, *isr, *devcfg, *notify_base;
static u32 notify_mult;
static u64 shm_base, shm_len;

static u8 cc_r8(u32 o) { return *(volatile u8 *)(common + o); }
static u16 cc_r16(u32 o) { return *(volatile u16 *)(common + o); }
static u32 cc_r32(u32 o) { return *(volatile u32 *)(common + o); }
static void cc_w8(u32 o, u8 v) { *(volatile u8 *)(common + o) = v; }
static void cc_w16(u32 o, u16 v) { *(volatile u16 *)(common + o) = v; }
static void cc_w32(u32 o, u32 v) { *(volatile u32 *)(common + o) = v; }
static void cc_w64(u32 o, u64 v)
{
    cc_w32(o, (u32)v);
    cc_w32(o + 4, (u32)(v >> 32));
}

static u64 bar_address(u32 dev, u32 bar)
{
    u32 lo = cfg_read32(dev, 0x10 + 4 * bar);
    u64 a = lo & ~0xfull;
    if ((lo & 0x6) == 0x4) /* 64-bit BAR */
        a |= (u64)cfg_read32(dev, 0x14 + 4 * bar) << 32;
    return a;
}

/* Sizes a BAR the way firmware does (write all-ones, read the mask back, restore). */
static u64 bar_size(u32 dev, u32 bar)
{
    u32 off = 0x10 + 4 * bar;
    u32 lo = cfg_read32(dev, off), hi = cfg_read32(dev, off + 4);
    cfg_write32(dev, off, 0xffffffffu);
    cfg_write32(dev, off + 4, 0xffffffffu);
    u64 mask = ((u64)cfg_read32(dev, off + 4) << 32) | (cfg_read32(dev, off) & ~0xfu);
    cfg_write32(dev, off, lo);
    cfg_write32(dev, off + 4, hi);
    return ~mask + 1;
}

static void find_gpu(void)
{
    gpu_dev = 32;
    for (u32 d = 0; d < 32; d++) {
        u32 id = cfg_read32(d, 0);
        if ((id & 0xffff) == 0x1af4 && (id >> 16) == 0x1050) {
            gpu_dev = d;
            break;
        }
    }
    if (gpu_dev == 32)
        fatal("no virtio-gpu (1af4:1050) on PCI bus 0");
    u32 dev = gpu_dev;
    if (!(cfg_read32(dev, 0x04) & (1u << 20)))
        fatal("virtio-gpu has no capability list");
    if (bar_size(dev, 0) < 0x4000)
        fatal("BAR0 is smaller than 16 KiB");
    /* memory space + bus master */
    cfg_write32(dev, 0x04, (cfg_read32(dev, 0x04) & 0xffff) | 0x6);
    u32 ptr = cfg_read8(dev, 0x34) & 0xfc;
    int guard = 0;
    while (ptr && guard++ < 48) {
        u8 vndr = cfg_read8(dev, ptr), next = cfg_read8(dev, ptr + 1);
        if (vndr == 0x09) {
            u8 type = cfg_read8(dev, ptr + 3), bar = cfg_read8(dev, ptr + 4);
            u8 id = cfg_read8(dev, ptr + 5);
            u64 off = cfg_read32(dev, ptr + 8), len = cfg_read32(dev, ptr + 12);
            volatile u8 *at = (volatile u8 *)(bar_address(dev, bar) + off);
            switch (type) {
            case VIRTIO_PCI_CAP_COMMON_CFG: common = at; break;
            case VIRTIO_PCI_CAP_ISR_CFG: isr = at; break;
            case VIRTIO_PCI_CAP_DEVICE_CFG: devcfg = at; break;
            case VIRTIO_PCI_CAP_NOTIFY_CFG:
                notify_base = at;
                notify_mult = cfg_read32(dev, ptr + 16);
                break;
            case VIRTIO_PCI_CAP_SHARED_MEMORY_CFG:
                if (id == VIRTIO_GPU_SHM_ID_HOST_VISIBLE) {
                    off |= (u64)cfg_read32(dev, ptr + 16) << 32;
                    len |= (u64)cfg_read32(dev, ptr + 20) << 32;
                    shm_base = bar_address(dev, bar) + off;
                    shm_len = len;
                }
                break;
            }
        }
        ptr = next & 0xfc;
    }
    if (!common || !isr || !devcfg || !notify_base)
        fatal("a virtio capability is missing");
    if (!shm_len)
        fatal("no host-visible shared memory region (id 1)");
}

/* ---- split virtqueues ---- */

#define QSIZE 256
#define SLOTS (QSIZE / 2) /* a command = 2 descriptors: request, response */
#define REQ_MAX 128
#define RESP_MAX 64

struct desc {
    u64 addr;
    u32 len;
    u16 flags;
    u16 next;
};
struct avail {
    u16 flags;
    u16 idx;
    u16 ring[QSIZE];
    u16 used_event;
};
struct used_elem {
    u32 id;
    u32 len;
};
struct used {
    u16 flags;
    u16 idx;
    struct used_elem ring[QSIZE];
    u16 avail_event;
};

#define VIRTQ_DESC_F_NEXT 1
#define VIRTQ_DESC_F_WRITE 2
#define VRING_AVAIL_F_NO_INTERRUPT 1

struct vq {
    struct desc desc[QSIZE] __attribute__((aligned(16)));
    struct avail avail __attribute__((aligned(2)));
    struct used used __attribute__((aligned(4096)));
    u16 size, avail_idx, last_used, notify_off;
};

static struct vq ctrlq __attribute__((aligned(4096)));
static struct vq cursorq __attribute__((aligned(4096)));

/* A command slot: its buffers and what the driver does with the answer. */
struct slot {
    u8 req[REQ_MAX] __attribute__((aligned(8)));
    u8 resp[RESP_MAX] __attribute__((aligned(8)));
    u32 cmd, want, busy, done, req_len;
    u64 t_submit, t_done;
};
static struct slot slots[SLOTS];
static u32 in_flight;

static void setup_queue(struct vq *q, u16 index)
{
    memset(q, 0, sizeof(*q));
    cc_w16(CC_Q_SELECT, index);
    u16 max = cc_r16(CC_Q_SIZE);
    if (max == 0)
        fatal("queue not available");
    u16 size = max < QSIZE ? max : QSIZE;
    if (size & (size - 1))
        fatal("device offers a queue size that is not a power of two");
    q->size = size;
    cc_w16(CC_Q_SIZE, size);
    cc_w64(CC_Q_DESC, (u64)(uintptr_t)q->desc);
    cc_w64(CC_Q_AVAIL, (u64)(uintptr_t)&q->avail);
    cc_w64(CC_Q_USED, (u64)(uintptr_t)&q->used);
    q->notify_off = cc_r16(CC_Q_NOFF);
    /* We poll the used ring: no used-buffer notifications, please. */
    q->avail.flags = VRING_AVAIL_F_NO_INTERRUPT;
    cc_w16(CC_Q_ENABLE, 1);
    if (cc_r16(CC_Q_ENABLE) != 1)
        fatal("queue enable did not stick");
}

static void kick(struct vq *q, u16 index)
{
    barrier();
    *(volatile u16 *)(notify_base + (u64)q->notify_off * notify_mult) = index;
    R->kicks++;
}

static u32 num_capsets;
static void mismatch(u64 offset);
static volatile u64 *window_at(u64 offset);

static void device_init(void)
{
    cc_w8(CC_STATUS, 0);
    /* A reset the device did not complete reads DEVICE_NEEDS_RESET, never 0: by the time the
     * read returns, the VMM has stopped that device and restored the window. Reset again. */
    for (u8 st; (st = cc_r8(CC_STATUS)) != 0;) {
        if (st & S_NEEDS_RESET) {
            R->resets_refused++;
            cc_w8(CC_STATUS, 0);
        }
    }
    /* A completed reset left nothing of the device in the window: its first page reads
     * zeros (without memslots in per-blob-slot mode, a read there is a hole). */
    if (!P->holes_expected) {
        volatile u64 *w = window_at(0);
        for (u64 i = 0; i < 4096 / 8; i++) {
            if (w[i] != 0) {
                mismatch(8 * i);
                break;
            }
        }
    }
    cc_w8(CC_STATUS, S_ACKNOWLEDGE);
    cc_w8(CC_STATUS, S_ACKNOWLEDGE | S_DRIVER);
    cc_w32(CC_DFSELECT, 0);
    u64 f = cc_r32(CC_DF);
    cc_w32(CC_DFSELECT, 1);
    f |= (u64)cc_r32(CC_DF) << 32;
    u64 want = F_VERSION_1 | F_VIRGL | F_RESOURCE_BLOB | F_CONTEXT_INIT;
    if ((f & want) != want)
        fatal("device lacks VERSION_1, VIRGL, RESOURCE_BLOB or CONTEXT_INIT");
    cc_w32(CC_GFSELECT, 0);
    cc_w32(CC_GF, (u32)want);
    cc_w32(CC_GFSELECT, 1);
    cc_w32(CC_GF, (u32)(want >> 32));
    cc_w8(CC_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
    if (!(cc_r8(CC_STATUS) & S_FEATURES_OK))
        fatal("device refused our features");
    if (cc_r16(CC_NUM_QUEUES) < 2)
        fatal("device has fewer than 2 queues");
    setup_queue(&ctrlq, 0);
    setup_queue(&cursorq, 1);
    cc_w8(CC_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
    if (cc_r8(CC_STATUS) & (S_NEEDS_RESET | S_FAILED))
        fatal("device failed during initialisation");
    num_capsets = *(volatile u32 *)(devcfg + 12);
    R->num_scanouts = *(volatile u32 *)(devcfg + 8);
    for (u32 i = 0; i < SLOTS; i++)
        slots[i].busy = 0;
    in_flight = 0;
}

/* ---- commands ---- */

static void hdr(u8 *b, u32 type, u32 ctx)
{
    memset(b, 0, 24);
    *(u32 *)b = type;
    *(u32 *)(b + 16) = ctx;
}

static struct slot *new_cmd(u32 type, u32 ctx, u32 want, u32 len)
{
    for (u32 i = 0; i < SLOTS; i++) {
        struct slot *s = &slots[i];
        if (!s->busy) {
            memset(s->req, 0, REQ_MAX);
            memset(s->resp, 0, RESP_MAX);
            hdr(s->req, type, ctx);
            s->cmd = type;
            s->want = want;
            s->req_len = len;
            s->busy = 1;
            s->done = 0;
            return s;
        }
    }
    fatal("no free command slot");
    return 0;
}

/* Puts a command's two descriptors in the controlq (no kick yet). */
static void post(struct slot *s)
{
    u32 i = (u32)(s - slots);
    u16 head = (u16)(2 * i);
    struct vq *q = &ctrlq;
    if (head + 1 >= q->size)
        fatal("command slot beyond the queue size");
    q->desc[head] = (struct desc){(u64)(uintptr_t)s->req, s->req_len, VIRTQ_DESC_F_NEXT, (u16)(head + 1)};
    q->desc[head + 1] = (struct desc){(u64)(uintptr_t)s->resp, RESP_MAX, VIRTQ_DESC_F_WRITE, 0};
    q->avail.ring[q->avail_idx % q->size] = head;
    barrier();
    q->avail_idx++;
    q->avail.idx = q->avail_idx;
    s->t_submit = rdtsc();
    in_flight++;
    if (in_flight > R->in_flight_max)
        R->in_flight_max = in_flight;
}

static int device_lost;

/* Takes every used entry; returns how many. */
static u32 reap(void)
{
    struct vq *q = &ctrlq;
    u32 n = 0;
    barrier();
    while (q->last_used != *(volatile u16 *)&q->used.idx) {
        barrier();
        struct used_elem e = q->used.ring[q->last_used % q->size];
        q->last_used++;
        n++;
        u32 i = e.id / 2;
        if (e.id % 2 || i >= SLOTS || !slots[i].busy || slots[i].done) {
            R->errors++;
            copy_msg("device returned a descriptor that is not in flight");
            continue;
        }
        slots[i].done = 1;
        slots[i].t_done = rdtsc();
        in_flight--;
        R->commands++;
    }
    return n;
}

/* Waits until `s` is done (or the device is lost). Polls the used ring; every 64K empty
 * polls it lets the VMM look at the device, then reads the status. */
static int wait(struct slot *s)
{
    u64 polls = 0;
    while (!s->done) {
        if (device_lost)
            return -1;
        if (reap())
            continue;
        R->polls++;
        ++polls;
        if ((polls & 0x3ffff) == 0) {
            event(EV_WAITING, polls);
            if (cc_r8(CC_STATUS) & S_NEEDS_RESET) {
                device_lost = 1;
                return -1;
            }
        }
        __asm__ volatile("pause");
    }
    return 0;
}

/* The response of a done command; 0 if it is an error (counted). */
static u8 *answer(struct slot *s)
{
    u32 type = *(u32 *)s->resp;
    s->busy = 0;
    if (type != s->want) {
        R->errors++;
        R->last_error_type = type;
        R->last_error_cmd = s->cmd;
        return 0;
    }
    return s->resp;
}

/* ---- latency histograms ---- */

static void record(volatile u32 *hist, u64 ticks)
{
    u32 lg = 63 - (u32)__builtin_clzll(ticks | 1);
    u32 mant = lg >= 4 ? (u32)(ticks >> (lg - 4)) & 0xf : (u32)(ticks << (4 - lg)) & 0xf;
    u32 b = lg * 16 + mant;
    if (b < 1024)
        hist[b]++;
}

/* ---- the shm pattern (device/src/backend/shm.rs) ---- */

static u64 splitmix(u64 z)
{
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
static u64 pattern_qword(u64 seed, u64 index) { return splitmix(seed ^ index); }

static u64 rng_state;
static u64 rng_next(void)
{
    rng_state += 0x9e3779b97f4a7c15ull;
    u64 z = rng_state;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
static u64 rng_below(u64 n) { return n ? rng_next() % n : 0; }
static u64 blob_size(void)
{
    u64 shift = rng_below(10);
    u64 pages = (1ull << shift) + rng_below(1ull << shift);
    if (pages > 512)
        pages = 512;
    return pages * 4096;
}

/* ---- the workload ---- */

#define CTX 1
#define OPS_CTX 2
#define MAX_LIVE 4096

struct blob {
    u32 res;
    u64 offset, size, seed;
    u64 written_at, written; /* the guest's write, if any (written_at = ~0: none) */
};
static struct blob live[MAX_LIVE];
static u32 nlive;
static u32 next_res = 1;
static u32 ops_ctx = CTX;

static void mismatch(u64 offset)
{
    if (R->mismatches < MAX_PENDING_MISMATCHES)
        R->mismatch_at[R->mismatches] = offset;
    R->mismatches++;
}

static volatile u64 *window_at(u64 offset) { return (volatile u64 *)(shm_base + offset); }

/* Every qword of the blob must be the FILL pattern (with the guest's own write, if any). */
static void check_blob(struct blob *b)
{
    volatile u64 *w = window_at(b->offset);
    u64 n = b->size / 8;
    for (u64 i = 0; i < n; i++) {
        u64 want = (b->written_at == i) ? b->written : pattern_qword(b->seed, i);
        if (w[i] != want) {
            mismatch(b->offset + 8 * i);
            return;
        }
    }
    R->verified++;
}

/* After an unmap or a device loss the range must be background: zeros. In per-blob-slot
 * mode an unmapped range has no memslot: the VMM answers the read (a hole) with zero, so one
 * read per range is enough there. */
static void check_gone(u64 offset, u64 size)
{
    volatile u64 *w = window_at(offset);
    u64 n = P->holes_expected ? 1 : size / 8;
    for (u64 i = 0; i < n; i++) {
        if (w[i] != 0) {
            mismatch(offset + 8 * i);
            return;
        }
    }
    R->verified++;
}

static void put_u32(u8 *b, u32 at, u32 v) { *(u32 *)(b + at) = v; }
static void put_u64(u8 *b, u32 at, u64 v) { *(u64 *)(b + at) = v; }

static struct slot *cmd_ctx_create(u32 ctx, u32 capset)
{
    struct slot *s = new_cmd(VIRTIO_GPU_CMD_CTX_CREATE, ctx, VIRTIO_GPU_RESP_OK_NODATA, 96);
    put_u32(s->req, 24, 7); /* nlen */
    put_u32(s->req, 28, capset & VIRTIO_GPU_CONTEXT_INIT_CAPSET_ID_MASK);
    const char *name = "hostmem";
    for (int i = 0; i < 7; i++)
        s->req[32 + i] = (u8)name[i];
    post(s);
    return s;
}

static struct slot *cmd_create_blob(u32 res, u64 size)
{
    struct slot *s = new_cmd(VIRTIO_GPU_CMD_RESOURCE_CREATE_BLOB, CTX, VIRTIO_GPU_RESP_OK_NODATA, 56);
    put_u32(s->req, 24, res);
    put_u32(s->req, 28, VIRTIO_GPU_BLOB_MEM_HOST3D);
    put_u32(s->req, 32, VIRTIO_GPU_BLOB_FLAG_USE_MAPPABLE);
    put_u32(s->req, 36, 0); /* nr_entries */
    put_u64(s->req, 40, 0); /* blob_id */
    put_u64(s->req, 48, size);
    post(s);
    return s;
}

/* SUBMIT_3D with one shm stream op: FILL (with seed) or CHECKSUM. */
static struct slot *cmd_stream(u32 op, u32 res, u64 len, u64 seed)
{
    u32 oplen = op == OP_FILL ? 32 : 24;
    struct slot *s = new_cmd(VIRTIO_GPU_CMD_SUBMIT_3D, ops_ctx, VIRTIO_GPU_RESP_OK_NODATA, 32 + oplen);
    put_u32(s->req, 24, oplen);
    put_u32(s->req, 32, op);
    put_u32(s->req, 36, res);
    put_u64(s->req, 40, 0);
    put_u64(s->req, 48, len);
    if (op == OP_FILL)
        put_u64(s->req, 56, seed);
    post(s);
    return s;
}

static struct slot *cmd_map(u32 res, u64 offset)
{
    struct slot *s = new_cmd(VIRTIO_GPU_CMD_RESOURCE_MAP_BLOB, CTX, VIRTIO_GPU_RESP_OK_MAP_INFO, 40);
    put_u32(s->req, 24, res);
    put_u64(s->req, 32, offset);
    post(s);
    return s;
}

static struct slot *cmd_res(u32 type, u32 res)
{
    struct slot *s = new_cmd(type, CTX, VIRTIO_GPU_RESP_OK_NODATA, 32);
    put_u32(s->req, 24, res);
    post(s);
    return s;
}

static struct slot *cmd_capset_info(u32 index)
{
    struct slot *s = new_cmd(VIRTIO_GPU_CMD_GET_CAPSET_INFO, 0, VIRTIO_GPU_RESP_OK_CAPSET_INFO, 32);
    put_u32(s->req, 24, index);
    post(s);
    return s;
}

/* Brings the device up (again) and creates the contexts. */
static void start_device(void)
{
    device_lost = 0;
    device_init();
    struct slot *s[4];
    u32 n = num_capsets < 4 ? num_capsets : 4;
    for (u32 i = 0; i < n; i++)
        s[i] = cmd_capset_info(i);
    kick(&ctrlq, 0);
    for (u32 i = 0; i < n; i++) {
        if (wait(s[i]) || !answer(s[i]))
            fatal("GET_CAPSET_INFO failed");
        R->capsets++;
    }
    struct slot *c = cmd_ctx_create(CTX, P->ctx_capset);
    struct slot *o = P->ops_capset && P->ops_capset != OPS_NONE ? cmd_ctx_create(OPS_CTX, P->ops_capset) : 0;
    kick(&ctrlq, 0);
    if (wait(c) || !answer(c))
        fatal("CTX_CREATE failed");
    if (o && (wait(o) || !answer(o)))
        fatal("CTX_CREATE of the ops context failed");
    ops_ctx = o ? OPS_CTX : CTX;
}

/* The device was lost with commands in flight: the VMM restored the window (everything
 * reads zeros) and restarted the device, which knows none of our blobs. */
static void recover(void)
{
    event(EV_DEVICE_LOST, nlive);
    R->lost_commands += in_flight;
    for (u32 i = 0; i < nlive; i++)
        check_gone(live[i].offset, live[i].size);
    nlive = 0;
    R->device_resets++;
    start_device();
    event(EV_REINITIALISED, 0);
}

static int overlaps(u64 off, u64 size)
{
    for (u32 i = 0; i < nlive; i++)
        if (off < live[i].offset + live[i].size && live[i].offset < off + size)
            return 1;
    return 0;
}

/* A random page-aligned offset where `size` bytes overlap neither a live blob nor one of
 * the `nb` blobs of the batch being built. */
static int free_offset(u64 size, const struct blob *batch, u32 nb, u64 *out)
{
    if (size > shm_len)
        return 0;
    u64 slots_ = (shm_len - size) / 4096 + 1;
    for (int t = 0; t < 64; t++) {
        u64 off = rng_below(slots_) * 4096;
        int clash = overlaps(off, size);
        for (u32 j = 0; j < nb && !clash; j++)
            clash = off < batch[j].offset + batch[j].size && batch[j].offset < off + size;
        if (!clash) {
            *out = off;
            return 1;
        }
    }
    return 0;
}

/* Unmaps (or unrefs while mapped) the oldest `n` live blobs: first every UNMAP_BLOB (one
 * in eight an UNREF of the mapped blob, which unmaps it first) in one batch, then the UNREFs
 * of the unmapped ones in a second, so that the unmap latencies are those of unmaps. */
static int retire(u32 n)
{
    if (n > nlive)
        n = nlive;
    if (n > 32)
        n = 32;
    struct slot *first[32], *ur[32];
    u32 unref_only[32];
    for (u32 i = 0; i < n; i++) {
        unref_only[i] = rng_below(8) == 0;
        first[i] = cmd_res(unref_only[i] ? VIRTIO_GPU_CMD_RESOURCE_UNREF : VIRTIO_GPU_CMD_RESOURCE_UNMAP_BLOB,
                           live[i].res);
    }
    kick(&ctrlq, 0);
    u32 ok[32];
    for (u32 i = 0; i < n; i++)
        if (wait(first[i]))
            return -1;
    for (u32 i = 0; i < n; i++) {
        record(R->unmap_hist, first[i]->t_done - first[i]->t_submit);
        R->unmap_samples++;
        ok[i] = answer(first[i]) != 0;
        ur[i] = unref_only[i] ? 0 : cmd_res(VIRTIO_GPU_CMD_RESOURCE_UNREF, live[i].res);
    }
    kick(&ctrlq, 0);
    for (u32 i = 0; i < n; i++) {
        if (ur[i]) {
            if (wait(ur[i]))
                return -1;
            ok[i] = answer(ur[i]) && ok[i];
        }
        if (ok[i])
            check_gone(live[i].offset, live[i].size);
    }
    for (u32 i = n; i < nlive; i++)
        live[i - n] = live[i];
    nlive -= n;
    return 0;
}

/* Creates and fills up to `n` blobs in one batch, maps them in a second (so that the map
 * latencies are those of maps), checks every byte through the window, and has the guest
 * write into every fourth one for the device to checksum. */
static int add_blobs(u32 n, u64 *done)
{
    struct blob nb[16];
    struct slot *cr[16], *fi[16], *mp[16];
    u32 k = 0;
    for (u32 i = 0; i < n && k < 16; i++) {
        struct blob b = {next_res++, 0, blob_size(), rng_next(), ~0ull, 0};
        if (!free_offset(b.size, nb, k, &b.offset)) {
            (*done)++; /* no room for it: tried, not mapped */
            continue;
        }
        nb[k++] = b;
    }
    /* OPS_NONE: no device fills; the guest writes each pattern itself once it is mapped. */
    int fills = P->ops_capset != OPS_NONE;
    for (u32 i = 0; i < k; i++) {
        cr[i] = cmd_create_blob(nb[i].res, nb[i].size);
        fi[i] = fills ? cmd_stream(OP_FILL, nb[i].res, nb[i].size, nb[i].seed) : 0;
    }
    kick(&ctrlq, 0);
    u32 ok[16];
    for (u32 i = 0; i < k; i++) {
        if (wait(cr[i]) || (fi[i] && wait(fi[i])))
            return -1;
        ok[i] = answer(cr[i]) != 0;
        ok[i] = (!fi[i] || answer(fi[i])) && ok[i];
        mp[i] = ok[i] ? cmd_map(nb[i].res, nb[i].offset) : 0;
    }
    kick(&ctrlq, 0);
    for (u32 i = 0; i < k; i++)
        if (mp[i] && wait(mp[i]))
            return -1;
    struct slot *ck[16];
    u32 nck = 0;
    u32 ckblob[16];
    for (u32 i = 0; i < k; i++) {
        (*done)++;
        if (mp[i]) {
            record(R->map_hist, mp[i]->t_done - mp[i]->t_submit);
            R->map_samples++;
            ok[i] = answer(mp[i]) != 0;
        }
        if (!ok[i]) {
            /* the blob may exist: drop it */
            struct slot *u = cmd_res(VIRTIO_GPU_CMD_RESOURCE_UNREF, nb[i].res);
            kick(&ctrlq, 0);
            if (wait(u))
                return -1;
            u->busy = 0;
            continue;
        }
        R->blobs_mapped++;
        struct blob *b = &live[nlive++];
        *b = nb[i];
        if (!fills)
            for (u64 q = 0; q < b->size / 8; q++)
                window_at(b->offset)[q] = pattern_qword(b->seed, q);
        check_blob(b);
        if (fills && b->res % 4 == 0) {
            b->written_at = rng_below(b->size / 8);
            b->written = rng_next();
            window_at(b->offset)[b->written_at] = b->written;
            ckblob[nck] = nlive - 1;
            ck[nck++] = cmd_stream(OP_CHECKSUM, b->res, b->size, 0);
        }
    }
    if (nck)
        kick(&ctrlq, 0);
    for (u32 i = 0; i < nck; i++) {
        if (wait(ck[i]))
            return -1;
        u8 *r = answer(ck[i]);
        if (!r)
            continue;
        struct blob *b = &live[ckblob[i]];
        u64 h = 0xcbf29ce484222325ull;
        for (u64 q = 0; q < b->size / 8; q++) {
            u64 v = q == b->written_at ? b->written : pattern_qword(b->seed, q);
            for (int byte = 0; byte < 8; byte++) {
                h ^= (v >> (8 * byte)) & 0xff;
                h *= 0x100000001b3ull;
            }
        }
        if (*(u64 *)(r + 24) == h)
            R->verified++;
        else
            mismatch(b->offset + 8 * b->written_at);
    }
    return 0;
}

/* The test pattern, drawn through a 2D resource on scanout 0 (vmm-side/src/run/mod.rs
 * checks the frame the device flushes with the same formula, guest::draw_pixel). */
static u32 draw_pixel(u64 seed, u32 x, u32 y)
{
    return (u32)splitmix(seed ^ DRAW_SALT ^ ((u64)y << 32 | x)) | 0xff000000u;
}

static void rect_at(u8 *b, u32 at, u32 w, u32 h)
{
    put_u32(b, at, 0);
    put_u32(b, at + 4, 0);
    put_u32(b, at + 8, w);
    put_u32(b, at + 12, h);
}

/* Posts the `n` commands one at a time, in order (each depends on the one before): 1 when
 * every one was answered as wanted, 0 when one failed (`why` noted, the rest dropped), -1
 * when the device was lost. */
static int in_order(struct slot **s, u32 n, const char *why)
{
    for (u32 i = 0; i < n; i++) {
        post(s[i]);
        kick(&ctrlq, 0);
        if (wait(s[i]))
            return -1;
        if (!answer(s[i])) {
            for (u32 j = i + 1; j < n; j++)
                s[j]->busy = 0;
            copy_msg(why);
            return 0;
        }
    }
    return 1;
}

/* A w x h 2D resource `res` of `format` holding draw_pixel(seed) from guest RAM at `gpa`:
 * the pattern written there, then RESOURCE_CREATE_2D, ATTACH_BACKING and
 * TRANSFER_TO_HOST_2D queued in s[0..3] (the caller adds its own and sends them in order). */
static void pattern_2d(struct slot **s, u32 res, u32 format, u64 gpa, u32 w, u32 h, u64 seed)
{
    volatile u32 *px = (volatile u32 *)(uintptr_t)gpa;
    for (u32 y = 0; y < h; y++)
        for (u32 x = 0; x < w; x++)
            px[y * w + x] = draw_pixel(seed, x, y);
    barrier();
    s[0] = new_cmd(VIRTIO_GPU_CMD_RESOURCE_CREATE_2D, 0, VIRTIO_GPU_RESP_OK_NODATA, 40);
    put_u32(s[0]->req, 24, res);
    put_u32(s[0]->req, 28, format);
    put_u32(s[0]->req, 32, w);
    put_u32(s[0]->req, 36, h);
    s[1] = new_cmd(VIRTIO_GPU_CMD_RESOURCE_ATTACH_BACKING, 0, VIRTIO_GPU_RESP_OK_NODATA, 48);
    put_u32(s[1]->req, 24, res);
    put_u32(s[1]->req, 28, 1); /* nr_entries */
    put_u64(s[1]->req, 32, gpa);
    put_u32(s[1]->req, 40, w * h * 4);
    s[2] = new_cmd(VIRTIO_GPU_CMD_TRANSFER_TO_HOST_2D, 0, VIRTIO_GPU_RESP_OK_NODATA, 56);
    rect_at(s[2]->req, 24, w, h);
    put_u64(s[2]->req, 40, 0); /* offset */
    put_u32(s[2]->req, 48, res);
}

/* RESOURCE_CREATE_2D, ATTACH_BACKING (guest RAM at DRAW_GPA), the pattern, TRANSFER_TO_HOST_2D,
 * SET_SCANOUT 0 and RESOURCE_FLUSH, each answered OK_NODATA (errors counted). */
static int draw(void)
{
    u32 res = next_res++, w = DRAW_WIDTH, h = DRAW_HEIGHT;
    struct slot *s[6];
    pattern_2d(s, res, VIRTIO_GPU_FORMAT_B8G8R8X8_UNORM, DRAW_GPA, w, h, P->seed);
    s[3] = new_cmd(VIRTIO_GPU_CMD_SET_SCANOUT, 0, VIRTIO_GPU_RESP_OK_NODATA, 48);
    rect_at(s[3]->req, 24, w, h);
    put_u32(s[3]->req, 40, 0); /* scanout_id */
    put_u32(s[3]->req, 44, res);
    s[4] = new_cmd(VIRTIO_GPU_CMD_RESOURCE_FLUSH, 0, VIRTIO_GPU_RESP_OK_NODATA, 48);
    rect_at(s[4]->req, 24, w, h);
    put_u32(s[4]->req, 40, res);
    int r = in_order(s, 5, "drawing the test pattern failed");
    if (r > 0)
        R->frames_drawn++;
    return r < 0 ? -1 : 0;
}

/* ---- the cursor queue ---- */

static u8 cursor_req[64] __attribute__((aligned(8)));

/* One command on the cursor queue (queue 1): one readable descriptor, which the device
 * returns used with length 0 (cursor commands have no response). */
static int cursor_cmd(u32 type, u32 res, u32 x, u32 y, u32 hot_x, u32 hot_y)
{
    struct vq *q = &cursorq;
    memset(cursor_req, 0, sizeof(cursor_req));
    hdr(cursor_req, type, 0);
    put_u32(cursor_req, 24, 0); /* pos.scanout_id */
    put_u32(cursor_req, 28, x);
    put_u32(cursor_req, 32, y);
    put_u32(cursor_req, 40, res);
    put_u32(cursor_req, 44, hot_x);
    put_u32(cursor_req, 48, hot_y);
    q->desc[0] = (struct desc){(u64)(uintptr_t)cursor_req, 56, 0, 0};
    q->avail.ring[q->avail_idx % q->size] = 0;
    barrier();
    q->avail_idx++;
    q->avail.idx = q->avail_idx;
    kick(q, 1);
    u64 polls = 0;
    while (*(volatile u16 *)&q->used.idx != q->avail_idx) {
        R->polls++;
        if ((++polls & 0x3ffff) == 0) {
            event(EV_WAITING, polls);
            if (cc_r8(CC_STATUS) & S_NEEDS_RESET) {
                device_lost = 1;
                return -1;
            }
        }
        __asm__ volatile("pause");
    }
    q->last_used = q->avail_idx;
    R->cursor_commands++;
    return 0;
}

/* A 64x64 cursor image in a 2D resource (guest RAM at CURSOR_GPA, transferred), then
 * UPDATE_CURSOR on scanout 0 and MOVE_CURSOR (its resource and hot spot 0: a move keeps
 * the image). vmm-side/src/run/mod.rs checks the device's last cursor against cursor_sent
 * and the image against guest::cursor_pixel. */
static int cursor(void)
{
    u32 res = next_res++, n = CURSOR_SIZE;
    struct slot *s[3];
    pattern_2d(s, res, VIRTIO_GPU_FORMAT_B8G8R8A8_UNORM, CURSOR_GPA, n, n, P->seed ^ CURSOR_SALT);
    int r = in_order(s, 3, "the cursor image failed");
    if (r <= 0)
        return r < 0 ? -1 : 0;
    if (cursor_cmd(VIRTIO_GPU_CMD_UPDATE_CURSOR, res, CURSOR_X0, CURSOR_Y0, CURSOR_HOT_X, CURSOR_HOT_Y) ||
        cursor_cmd(VIRTIO_GPU_CMD_MOVE_CURSOR, 0, CURSOR_X1, CURSOR_Y1, 0, 0))
        return -1;
    u32 sent[6] = {0, CURSOR_X1, CURSOR_Y1, res, CURSOR_HOT_X, CURSOR_HOT_Y};
    for (u32 i = 0; i < 6; i++)
        R->cursor_sent[i] = sent[i];
    return 0;
}

/* ---- a blob as the scanout ---- */

/* A DRAW_WIDTH x DRAW_HEIGHT blob, filled by the device (SUBMIT_3D FILL, seed ^
 * BLOB_SCANOUT_SALT), mapped at window offset 0 and checked through the window, shown on
 * scanout 0 with SET_SCANOUT_BLOB and flushed (run/mod.rs checks the frame against the
 * fill pattern). Left mapped and shown: draw() replaces it, blob_scanout_done() drops it.
 * Returns its resource id (0: it failed), -1 if the device was lost. */
static int64_t blob_scanout(void)
{
    u32 res = next_res++, w = DRAW_WIDTH, h = DRAW_HEIGHT;
    struct blob b = {res, 0, (u64)w * h * 4, P->seed ^ BLOB_SCANOUT_SALT, ~0ull, 0};
    /* OPS_NONE: no device fill; the guest writes the pattern itself once it is mapped. */
    int fills = P->ops_capset != OPS_NONE;
    struct slot *c = cmd_create_blob(res, b.size);
    struct slot *f = fills ? cmd_stream(OP_FILL, res, b.size, b.seed) : 0;
    kick(&ctrlq, 0);
    if (wait(c) || (f && wait(f)))
        return -1;
    int ok = answer(c) != 0;
    ok = (!f || answer(f)) && ok;
    if (!ok) {
        copy_msg("the scanout blob failed");
        return 0;
    }
    struct slot *m = cmd_map(res, b.offset);
    kick(&ctrlq, 0);
    if (wait(m))
        return -1;
    if (!answer(m)) {
        copy_msg("mapping the scanout blob failed");
        return res;
    }
    if (!fills)
        for (u64 q = 0; q < b.size / 8; q++)
            window_at(b.offset)[q] = pattern_qword(b.seed, q);
    check_blob(&b);
    struct slot *s[2];
    s[0] = new_cmd(VIRTIO_GPU_CMD_SET_SCANOUT_BLOB, 0, VIRTIO_GPU_RESP_OK_NODATA, 96);
    rect_at(s[0]->req, 24, w, h);
    put_u32(s[0]->req, 40, 0); /* scanout_id */
    put_u32(s[0]->req, 44, res);
    put_u32(s[0]->req, 48, w);
    put_u32(s[0]->req, 52, h);
    put_u32(s[0]->req, 56, VIRTIO_GPU_FORMAT_B8G8R8X8_UNORM);
    put_u32(s[0]->req, 64, w * 4); /* strides[0] */
    put_u32(s[0]->req, 80, 0);     /* offsets[0] */
    s[1] = new_cmd(VIRTIO_GPU_CMD_RESOURCE_FLUSH, 0, VIRTIO_GPU_RESP_OK_NODATA, 48);
    rect_at(s[1]->req, 24, w, h);
    put_u32(s[1]->req, 40, res);
    int r = in_order(s, 2, "showing the blob on scanout 0 failed");
    if (r < 0)
        return -1;
    if (r > 0)
        R->blob_scanouts++;
    return res;
}

/* Unmaps and unrefs the scanout blob (no longer shown: draw() set scanout 0 to the
 * pattern); its range must read zeros again. */
static int blob_scanout_done(u32 res)
{
    struct slot *u = cmd_res(VIRTIO_GPU_CMD_RESOURCE_UNMAP_BLOB, res);
    struct slot *d = cmd_res(VIRTIO_GPU_CMD_RESOURCE_UNREF, res);
    kick(&ctrlq, 0);
    if (wait(u) || wait(d))
        return -1;
    int ok = answer(u) != 0;
    ok = answer(d) && ok;
    if (ok)
        check_gone(0, (u64)DRAW_WIDTH * DRAW_HEIGHT * 4);
    return 0;
}

/* Unmaps and unrefs everything still live. */
static void drain(void)
{
    while (nlive) {
        if (retire(nlive) < 0) {
            recover();
            return;
        }
    }
}

_Static_assert(offsetof(struct results, mismatch_at) == 144, "results layout (guest.rs)");
_Static_assert(offsetof(struct results, map_hist) == 208, "results layout (guest.rs)");
_Static_assert(offsetof(struct results, unmap_hist) == 4304, "results layout (guest.rs)");
_Static_assert(offsetof(struct results, message) == 8400, "results layout (guest.rs)");
_Static_assert(offsetof(struct params, ctx_capset) == 48, "params layout (guest.rs)");
_Static_assert(offsetof(struct results, frames_drawn) == 8664, "results layout (guest.rs)");
_Static_assert(offsetof(struct results, cursor_commands) == 8672, "results layout (guest.rs)");
_Static_assert(offsetof(struct results, cursor_sent) == 8680, "results layout (guest.rs)");
_Static_assert(offsetof(struct results, blob_scanouts) == 8704, "results layout (guest.rs)");
_Static_assert(offsetof(struct results, num_scanouts) == 8712, "results layout (guest.rs)");
_Static_assert(sizeof(struct params) == 64, "params layout (guest.rs)");

void driver_main(void);
void driver_main(void)
{
    if (P->magic != PARAMS_MAGIC)
        fatal("bad params magic");
    R->tsc_start = rdtsc();
    rng_state = P->seed;
    find_gpu();
    start_device();
    u64 max_live = P->max_live;
    if (max_live > MAX_LIVE)
        max_live = MAX_LIVE;
    if (max_live < 2)
        max_live = 2;
    u64 batch = P->batch ? P->batch : 8;
    if (batch > 16)
        batch = 16;

    /* Warm-up: one page-sized blob through every command, before the VMM's baseline. */
    {
        u64 saved = rng_state;
        struct slot *c = cmd_create_blob(next_res, 4096);
        struct slot *m = cmd_map(next_res, 0);
        struct slot *u = cmd_res(VIRTIO_GPU_CMD_RESOURCE_UNMAP_BLOB, next_res);
        struct slot *r = cmd_res(VIRTIO_GPU_CMD_RESOURCE_UNREF, next_res);
        kick(&ctrlq, 0);
        if (wait(c) || wait(m) || wait(u) || wait(r)) {
            recover();
        } else {
            int ok = answer(c) != 0;
            ok = answer(m) && ok;
            ok = answer(u) && ok;
            ok = answer(r) && ok;
            if (!ok)
                copy_msg("warm-up blob failed");
        }
        next_res++;
        rng_state = saved;
    }
    event(EV_WARMED_UP, 0);
    /* A hostile guest's events (test knob): progress far past the workload, the warm-up
     * and a device loss again and again; the VMM's report must stay bounded. */
    for (u64 i = 1; i <= P->flood_events; i++) {
        event(EV_PROGRESS, i * (P->blobs + 1));
        event(EV_WARMED_UP, 0);
        event(EV_DEVICE_LOST, 0);
    }

    u64 done = 0;
    while (done < P->blobs) {
        /* make room, and now and then retire a few anyway */
        u32 n = (u32)(P->blobs - done < batch ? P->blobs - done : batch);
        u32 retire_n = 0;
        if (nlive + n > max_live)
            retire_n = (u32)(nlive + n - max_live);
        else if (nlive > 1 && rng_below(4) == 0)
            retire_n = 1 + (u32)rng_below(nlive / 2 + 1);
        if (retire_n && retire(retire_n) < 0) {
            recover();
            continue;
        }
        u64 before = done;
        if (add_blobs(n, &done) < 0) {
            /* the batch died with the device: do it again on the new one */
            done = before;
            recover();
            continue;
        }
        event(EV_PROGRESS, done);
    }
    drain();
    event(EV_DRAINED, 0);
    /* The display: a blob on scanout 0, then the pattern (the picture scanout 0 keeps), the
     * cursor over it. After a device loss each is done again on the new device, once. */
    for (int tries = 0; tries < 2; tries++) {
        int64_t blob = blob_scanout();
        if (blob >= 0 && draw() == 0 && (blob == 0 || blob_scanout_done((u32)blob) == 0) &&
            cursor() == 0)
            break;
        recover();
    }
    R->tsc_end = rdtsc();
    for (;;)
        event(EV_DONE, 0);
}
