/* The guest driver's ABI with the VMM (vmm-side/src/guest.rs mirrors every value here).
 *
 * Guest-physical layout (identity-mapped by the VMM's page tables, ring 3):
 *   0x0000_1000  GDT, page tables (written by the VMM)
 *   0x0008_0000  struct params   (VMM -> guest, before the vCPU starts)
 *   0x0008_1000  struct results  (guest -> VMM, read at every event exit)
 *   0x0010_0000  the driver image (text, data, bss: rings and command buffers)
 *   0x0020_0000  top of the stack
 *   0x0040_0000  the test pattern's framebuffer (DRAW_WIDTH x DRAW_HEIGHT, B8G8R8X8)
 *   0x0041_0000  the cursor image (CURSOR_SIZE x CURSOR_SIZE, B8G8R8A8)
 *
 * Events: the guest writes results.event_arg, then `out EVENT_PORT, eax` with eax = EV_*.
 * The VMM handles the exit and resumes the vCPU (or ends the run at EV_DONE).
 */
#ifndef HOSTMEM_GUEST_ABI_H
#define HOSTMEM_GUEST_ABI_H

#define PARAMS_GPA 0x80000ULL
#define RESULTS_GPA 0x81000ULL
#define IMAGE_GPA 0x100000ULL
#define STACK_TOP 0x200000ULL

#define DRAW_GPA 0x400000ULL
#define DRAW_WIDTH 64
#define DRAW_HEIGHT 64
#define DRAW_SALT 0x64726177ULL /* "draw" */

/* The cursor (after the pattern): UPDATE_CURSOR at CURSOR_X0,Y0 with the hot spot, then
 * MOVE_CURSOR to CURSOR_X1,Y1. The image: draw_pixel's formula with CURSOR_SALT. */
#define CURSOR_GPA 0x410000ULL
#define CURSOR_SIZE 64
#define CURSOR_SALT 0x63757273ULL /* "curs" */
#define CURSOR_X0 100
#define CURSOR_Y0 50
#define CURSOR_X1 210
#define CURSOR_Y1 130
#define CURSOR_HOT_X 3
#define CURSOR_HOT_Y 5

/* The blob scanout (before the pattern): a DRAW_WIDTH x DRAW_HEIGHT blob filled (SUBMIT_3D
 * FILL) with seed ^ BLOB_SCANOUT_SALT, shown by SET_SCANOUT_BLOB on scanout 0, flushed. */
#define BLOB_SCANOUT_SALT 0x626c6f62ULL /* "blob" */

#define EVENT_PORT 0x11
#define EV_DONE 1          /* results final; the run is over */
#define EV_WARMED_UP 2     /* warm-up blob done: the VMM takes its resource baseline */
#define EV_PROGRESS 3      /* arg = blobs done so far */
#define EV_WAITING 4       /* arg = polls in this wait so far: the VMM checks the device */
#define EV_DRAINED 5       /* every blob unmapped and unreferenced */
#define EV_DEVICE_LOST 6   /* arg = blobs that were live; the driver resets the device */
#define EV_FATAL 7         /* results.message says why; the run is over */
#define EV_REINITIALISED 8 /* after a loss: the new device is set up, no blob is live yet */

#define PARAMS_MAGIC 0x48534f4d454d4850ULL /* "PHMEMOSH" */
#define MAX_PENDING_MISMATCHES 8

#define OPS_NONE 0xffffffffu /* params.ops_capset: the backend takes no FILL/CHECKSUM streams */

struct params {
    uint64_t magic;
    uint64_t blobs;        /* blobs to create and map */
    uint64_t seed;
    uint64_t max_live;     /* most blobs mapped at once */
    uint64_t batch;        /* commands per batch (in flight at once), <= 64 */
    uint64_t flood_events; /* test only, 0 otherwise: raise each repeatable event this often */
    uint32_t ctx_capset;   /* capset of the context the blobs live in (0: default) */
    uint32_t ops_capset;   /* != 0: FILL/CHECKSUM streams go to a second context of this capset;
                            * OPS_NONE: no streams, the guest writes each blob's pattern */
    uint32_t holes_expected; /* per-blob-slot mode: an unmapped range reads as a hole (MMIO) */
    uint32_t pad;
};

struct results {
    uint64_t event_arg;
    uint64_t commands;       /* commands completed through the controlq */
    uint64_t errors;         /* commands answered with an error or an unexpected type */
    uint64_t in_flight_max;  /* most commands in the controlq at once */
    uint64_t verified;       /* checks that matched */
    uint64_t mismatches;     /* checks that did not */
    uint64_t blobs_mapped;
    uint64_t polls;          /* used-ring polls while waiting */
    uint64_t kicks;          /* notify writes */
    uint64_t capsets;        /* GET_CAPSET_INFO answered */
    uint64_t device_resets;  /* re-initialisations after the device was lost */
    uint64_t lost_commands;  /* commands in flight when the device was lost */
    uint64_t tsc_start, tsc_end;
    uint64_t map_samples, unmap_samples;
    uint64_t last_error_type;      /* response type of the last error */
    uint64_t last_error_cmd;       /* command type that got it */
    uint64_t mismatch_at[MAX_PENDING_MISMATCHES]; /* window offsets of the first mismatches */
    /* Latency histograms in TSC ticks: bucket (log2 << 4 | next 4 bits), 1024 buckets. */
    uint32_t map_hist[1024];
    uint32_t unmap_hist[1024];
    char message[256];
    uint64_t resets_refused; /* resets that read DEVICE_NEEDS_RESET instead of 0 (redone) */
    uint64_t frames_drawn;   /* test patterns drawn and flushed on scanout 0 */
    uint64_t cursor_commands; /* UPDATE_CURSOR and MOVE_CURSOR sent and used */
    uint32_t cursor_sent[6];  /* the cursor as the driver left it: scanout, x, y, resource, hot_x, hot_y */
    uint64_t blob_scanouts;   /* blobs shown with SET_SCANOUT_BLOB on scanout 0 and flushed */
    uint64_t num_scanouts;    /* virtio_gpu_config.num_scanouts as the driver read it */
};

#endif
