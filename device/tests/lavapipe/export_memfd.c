/* Allocates host-visible VkDeviceMemory on the host's lavapipe with an OPAQUE_FD export,
 * exports it (vkGetMemoryFdKHR) and prints "<pid> <fd> <allocation size>" per size given
 * on the command line, after writing word k of allocation i as k ^ (i << 24) through
 * vkMapMemory, then waits for stdin to close so the test can open
 * /proc/<pid>/fd/<fd>. What virglrenderer's render server gets from lavapipe for a venus
 * VkDeviceMemory blob, without the render server. No Vulkan headers on Debian 12's base
 * image: the few structures used are declared here (Vulkan 1.1 ABI, 64-bit). */
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef void *VkInstance, *VkPhysicalDevice, *VkDevice;
typedef uint64_t VkDeviceMemory;
typedef void (*PFN)(void);
typedef PFN (*GetInstanceProcAddr)(VkInstance, const char *);
typedef PFN (*GetDeviceProcAddr)(VkDevice, const char *);

struct app_info { int s; const void *n; const char *an; uint32_t av; const char *en; uint32_t ev, api; };
struct inst_info { int s; const void *n; uint32_t f; const struct app_info *a; uint32_t lc; const char *const *l; uint32_t ec; const char *const *e; };
struct queue_info { int s; const void *n; uint32_t f, family, count; const float *prio; };
struct dev_info { int s; const void *n; uint32_t f, qc; const struct queue_info *q; uint32_t lc; const char *const *l; uint32_t ec; const char *const *e; const void *feat; };
struct export_info { int s; const void *n; uint32_t types; };
struct alloc_info { int s; const void *n; uint64_t size; uint32_t type; };
struct fd_info { int s; const void *n; VkDeviceMemory mem; uint32_t type; };
struct mem_type { uint32_t flags, heap; };
struct mem_props { uint32_t tc; struct mem_type t[32]; uint32_t hc; struct { uint64_t size; uint32_t flags; } h[16]; };

#define HOST_VISIBLE 2u
#define OPAQUE_FD 1u

static void die(const char *what, int r) { fprintf(stderr, "export_memfd: %s: %d\n", what, r); exit(1); }

int main(int argc, char **argv) {
   void *lib = dlopen("libvulkan.so.1", RTLD_NOW);
   if (!lib) { fprintf(stderr, "export_memfd: no libvulkan.so.1\n"); return 3; }
   GetInstanceProcAddr gipa = (GetInstanceProcAddr)dlsym(lib, "vkGetInstanceProcAddr");
   struct app_info app = { 0, NULL, "hostmem", 1, "hostmem", 1, (1u << 22) | (1u << 12) };
   struct inst_info ii = { 1, NULL, 0, &app, 0, NULL, 0, NULL };
   VkInstance inst;
   int r = ((int (*)(const void *, const void *, VkInstance *))gipa(NULL, "vkCreateInstance"))(&ii, NULL, &inst);
   if (r) { fprintf(stderr, "export_memfd: no Vulkan instance (%d)\n", r); return 3; }
   uint32_t n = 1;
   VkPhysicalDevice pd;
   r = ((int (*)(VkInstance, uint32_t *, VkPhysicalDevice *))gipa(inst, "vkEnumeratePhysicalDevices"))(inst, &n, &pd);
   if (r < 0 || n == 0) { fprintf(stderr, "export_memfd: no Vulkan device\n"); return 3; }
   struct mem_props mp;
   ((void (*)(VkPhysicalDevice, struct mem_props *))gipa(inst, "vkGetPhysicalDeviceMemoryProperties"))(pd, &mp);
   uint32_t type = 32;
   for (uint32_t i = 0; i < mp.tc; i++)
      if (mp.t[i].flags & HOST_VISIBLE) { type = i; break; }
   if (type == 32) die("no host-visible memory type", 0);
   float prio = 1.0f;
   struct queue_info qi = { 2, NULL, 0, 0, 1, &prio };
   const char *ext[] = { "VK_KHR_external_memory_fd" };
   struct dev_info di = { 3, NULL, 0, 1, &qi, 0, NULL, 1, ext, NULL };
   VkDevice dev;
   r = ((int (*)(VkPhysicalDevice, const void *, const void *, VkDevice *))gipa(inst, "vkCreateDevice"))(pd, &di, NULL, &dev);
   if (r) die("vkCreateDevice", r);
   GetDeviceProcAddr gdpa = (GetDeviceProcAddr)gipa(inst, "vkGetDeviceProcAddr");
   int (*alloc)(VkDevice, const void *, const void *, VkDeviceMemory *) =
      (int (*)(VkDevice, const void *, const void *, VkDeviceMemory *))gdpa(dev, "vkAllocateMemory");
   int (*get_fd)(VkDevice, const void *, int *) = (int (*)(VkDevice, const void *, int *))gdpa(dev, "vkGetMemoryFdKHR");
   int (*map)(VkDevice, VkDeviceMemory, uint64_t, uint64_t, uint32_t, void **) =
      (int (*)(VkDevice, VkDeviceMemory, uint64_t, uint64_t, uint32_t, void **))gdpa(dev, "vkMapMemory");
   if (!alloc || !get_fd || !map) die("no vkAllocateMemory/vkGetMemoryFdKHR/vkMapMemory", 0);
   for (int i = 1; i < argc; i++) {
      struct export_info ei = { 1000072002, NULL, OPAQUE_FD };
      struct alloc_info ai = { 5, &ei, strtoull(argv[i], NULL, 0), type };
      VkDeviceMemory mem;
      if ((r = alloc(dev, &ai, NULL, &mem))) die("vkAllocateMemory", r);
      struct fd_info fi = { 1000074002, NULL, mem, OPAQUE_FD };
      int fd;
      if ((r = get_fd(dev, &fi, &fd))) die("vkGetMemoryFdKHR", r);
      /* What Vulkan's own view holds: word k of allocation i is k ^ (i << 24). */
      uint32_t *view;
      if ((r = map(dev, mem, 0, ~0ull, 0, (void **)&view))) die("vkMapMemory", r);
      for (uint64_t k = 0; k < ai.size / 4; k++) view[k] = (uint32_t)k ^ ((uint32_t)i << 24);
      printf("%d %d %llu\n", (int)getpid(), fd, (unsigned long long)ai.size);
   }
   fflush(stdout);
   char c;
   while (read(0, &c, 1) > 0) {}
   return 0;
}
