// The Venus check's guest program: host-visible VkDeviceMemory, mapped, written, transformed
// by a compute shader, read back and checked element by element.
//
//   vk-compute [--buffers N] [--live K] [--min-size BYTES] [--max-size BYTES] [--salt S]
//
// Buffer i has size min << (i mod steps), capped at max (4 KiB to 64 MiB by default), so
// every size class is mapped several times; K buffers are alive at once (allocated, mapped
// and written before the first of them is dispatched). For each element the program writes
// x = i ^ seed, the shader stores x * 2654435761 + (i ^ salt), and the program checks that
// value after the fence. It prints one line:
//   VKTEST-RESULT {"device":"...","driver_id":N,"buffers":N,"bytes_checked":N,
//                  "mismatches":N,"vk_errors":N,"first_error":"...","seconds":S}
// and exits 0 only with every buffer checked, 0 mismatches and 0 Vulkan errors.
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <vulkan/vulkan.h>

#include "vk-compute.spv.h"

static unsigned long vk_errors;
static char first_error[160];

static int check(VkResult r, const char *what) {
    if (r == VK_SUCCESS)
        return 1;
    if (!vk_errors++)
        snprintf(first_error, sizeof first_error, "%s: VkResult %d", what, (int)r);
    fprintf(stderr, "vk-compute: %s failed: VkResult %d\n", what, (int)r);
    return 0;
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

struct buf {
    VkBuffer buffer;
    VkDeviceMemory memory;
    VkDescriptorSet set;
    VkCommandBuffer cmd;
    VkFence fence;
    uint32_t *map;
    uint64_t size;
    uint32_t seed;
    int live;
};

struct ctx {
    VkDevice dev;
    VkQueue queue;
    VkPhysicalDeviceMemoryProperties mem;
    VkDescriptorSetLayout dsl;
    VkPipelineLayout layout;
    VkPipeline pipeline;
    VkDescriptorPool pool;
    VkCommandPool cmdpool;
    uint32_t max_groups;
    uint64_t atom;
    uint32_t salt;
};

static uint32_t expect(uint32_t i, uint32_t seed, uint32_t salt) {
    return (i ^ seed) * 2654435761u + (i ^ salt);
}

// Picks a HOST_VISIBLE type the buffer allows, HOST_COHERENT first.
static int mem_type(const struct ctx *c, uint32_t bits, int *coherent) {
    for (int pass = 0; pass < 2; pass++) {
        for (uint32_t t = 0; t < c->mem.memoryTypeCount; t++) {
            VkMemoryPropertyFlags f = c->mem.memoryTypes[t].propertyFlags;
            if (!(bits & (1u << t)) || !(f & VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT))
                continue;
            int coh = (f & VK_MEMORY_PROPERTY_HOST_COHERENT_BIT) != 0;
            if (pass == 0 && !coh)
                continue;
            *coherent = coh;
            return (int)t;
        }
    }
    return -1;
}

static void release(const struct ctx *c, struct buf *b) {
    if (b->map)
        vkUnmapMemory(c->dev, b->memory);
    if (b->fence)
        vkDestroyFence(c->dev, b->fence, NULL);
    if (b->cmd)
        vkFreeCommandBuffers(c->dev, c->cmdpool, 1, &b->cmd);
    if (b->set)
        vkFreeDescriptorSets(c->dev, c->pool, 1, &b->set);
    if (b->buffer)
        vkDestroyBuffer(c->dev, b->buffer, NULL);
    if (b->memory)
        vkFreeMemory(c->dev, b->memory, NULL);
    memset(b, 0, sizeof *b);
}

// Allocates, maps and fills one buffer and records its dispatch. 0 on a Vulkan error.
static int setup(struct ctx *c, struct buf *b, uint64_t size, uint32_t seed) {
    b->size = size;
    b->seed = seed;
    VkBufferCreateInfo bi = {
        .sType = VK_STRUCTURE_TYPE_BUFFER_CREATE_INFO,
        .size = size,
        .usage = VK_BUFFER_USAGE_STORAGE_BUFFER_BIT,
        .sharingMode = VK_SHARING_MODE_EXCLUSIVE,
    };
    if (!check(vkCreateBuffer(c->dev, &bi, NULL, &b->buffer), "vkCreateBuffer"))
        return 0;
    VkMemoryRequirements req;
    vkGetBufferMemoryRequirements(c->dev, b->buffer, &req);
    int coherent = 0;
    int type = mem_type(c, req.memoryTypeBits, &coherent);
    if (type < 0) {
        check(VK_ERROR_FEATURE_NOT_PRESENT, "no host-visible memory type");
        return 0;
    }
    VkMemoryAllocateInfo ai = {
        .sType = VK_STRUCTURE_TYPE_MEMORY_ALLOCATE_INFO,
        .allocationSize = req.size,
        .memoryTypeIndex = (uint32_t)type,
    };
    if (!check(vkAllocateMemory(c->dev, &ai, NULL, &b->memory), "vkAllocateMemory"))
        return 0;
    if (!check(vkBindBufferMemory(c->dev, b->buffer, b->memory, 0), "vkBindBufferMemory"))
        return 0;
    void *p = NULL;
    if (!check(vkMapMemory(c->dev, b->memory, 0, VK_WHOLE_SIZE, 0, &p), "vkMapMemory"))
        return 0;
    b->map = p;
    uint32_t n = (uint32_t)(size / 4);
    for (uint32_t i = 0; i < n; i++)
        b->map[i] = i ^ seed;
    VkMappedMemoryRange range = {
        .sType = VK_STRUCTURE_TYPE_MAPPED_MEMORY_RANGE,
        .memory = b->memory,
        .size = VK_WHOLE_SIZE,
    };
    if (!coherent &&
        !check(vkFlushMappedMemoryRanges(c->dev, 1, &range), "vkFlushMappedMemoryRanges"))
        return 0;

    VkDescriptorSetAllocateInfo dai = {
        .sType = VK_STRUCTURE_TYPE_DESCRIPTOR_SET_ALLOCATE_INFO,
        .descriptorPool = c->pool,
        .descriptorSetCount = 1,
        .pSetLayouts = &c->dsl,
    };
    if (!check(vkAllocateDescriptorSets(c->dev, &dai, &b->set), "vkAllocateDescriptorSets"))
        return 0;
    VkDescriptorBufferInfo dbi = {.buffer = b->buffer, .offset = 0, .range = size};
    VkWriteDescriptorSet w = {
        .sType = VK_STRUCTURE_TYPE_WRITE_DESCRIPTOR_SET,
        .dstSet = b->set,
        .descriptorCount = 1,
        .descriptorType = VK_DESCRIPTOR_TYPE_STORAGE_BUFFER,
        .pBufferInfo = &dbi,
    };
    vkUpdateDescriptorSets(c->dev, 1, &w, 0, NULL);

    VkCommandBufferAllocateInfo cai = {
        .sType = VK_STRUCTURE_TYPE_COMMAND_BUFFER_ALLOCATE_INFO,
        .commandPool = c->cmdpool,
        .level = VK_COMMAND_BUFFER_LEVEL_PRIMARY,
        .commandBufferCount = 1,
    };
    if (!check(vkAllocateCommandBuffers(c->dev, &cai, &b->cmd), "vkAllocateCommandBuffers"))
        return 0;
    VkCommandBufferBeginInfo cbi = {
        .sType = VK_STRUCTURE_TYPE_COMMAND_BUFFER_BEGIN_INFO,
        .flags = VK_COMMAND_BUFFER_USAGE_ONE_TIME_SUBMIT_BIT,
    };
    if (!check(vkBeginCommandBuffer(b->cmd, &cbi), "vkBeginCommandBuffer"))
        return 0;
    // The host's writes before the shader's reads, the shader's writes before the host's.
    VkMemoryBarrier in = {
        .sType = VK_STRUCTURE_TYPE_MEMORY_BARRIER,
        .srcAccessMask = VK_ACCESS_HOST_WRITE_BIT,
        .dstAccessMask = VK_ACCESS_SHADER_READ_BIT | VK_ACCESS_SHADER_WRITE_BIT,
    };
    vkCmdPipelineBarrier(b->cmd, VK_PIPELINE_STAGE_HOST_BIT,
                         VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT, 0, 1, &in, 0, NULL, 0, NULL);
    vkCmdBindPipeline(b->cmd, VK_PIPELINE_BIND_POINT_COMPUTE, c->pipeline);
    vkCmdBindDescriptorSets(b->cmd, VK_PIPELINE_BIND_POINT_COMPUTE, c->layout, 0, 1, &b->set, 0,
                            NULL);
    uint32_t params[2] = {n, c->salt};
    vkCmdPushConstants(b->cmd, c->layout, VK_SHADER_STAGE_COMPUTE_BIT, 0, sizeof params, params);
    uint32_t groups = (n + 63) / 64;
    if (groups > c->max_groups)
        groups = c->max_groups;
    vkCmdDispatch(b->cmd, groups, 1, 1);
    VkMemoryBarrier out = {
        .sType = VK_STRUCTURE_TYPE_MEMORY_BARRIER,
        .srcAccessMask = VK_ACCESS_SHADER_WRITE_BIT,
        .dstAccessMask = VK_ACCESS_HOST_READ_BIT,
    };
    vkCmdPipelineBarrier(b->cmd, VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT, VK_PIPELINE_STAGE_HOST_BIT,
                         0, 1, &out, 0, NULL, 0, NULL);
    if (!check(vkEndCommandBuffer(b->cmd), "vkEndCommandBuffer"))
        return 0;
    VkFenceCreateInfo fi = {.sType = VK_STRUCTURE_TYPE_FENCE_CREATE_INFO};
    if (!check(vkCreateFence(c->dev, &fi, NULL, &b->fence), "vkCreateFence"))
        return 0;
    b->live = coherent ? 1 : 2; // 2: invalidate before reading back
    return 1;
}

static uint64_t arg(int argc, char **argv, const char *name, uint64_t def) {
    for (int i = 1; i + 1 < argc; i++)
        if (!strcmp(argv[i], name))
            return strtoull(argv[i + 1], NULL, 0);
    return def;
}

int main(int argc, char **argv) {
    uint64_t nbuf = arg(argc, argv, "--buffers", 64);
    uint64_t live = arg(argc, argv, "--live", 4);
    uint64_t min = arg(argc, argv, "--min-size", 4096);
    uint64_t max = arg(argc, argv, "--max-size", 64ull << 20);
    struct ctx c = {.salt = (uint32_t)arg(argc, argv, "--salt", 0x5a17)};
    if (!live || live > 256 || min < 4 || min > max || (max / 4) > UINT32_MAX) {
        fprintf(stderr, "vk-compute: bad arguments\n");
        return 2;
    }
    double t0 = now();
    char device[VK_MAX_PHYSICAL_DEVICE_NAME_SIZE] = "none";
    int driver_id = 0;
    uint64_t done = 0, bytes = 0, mismatches = 0;
    VkInstance inst = VK_NULL_HANDLE;

    VkApplicationInfo app = {
        .sType = VK_STRUCTURE_TYPE_APPLICATION_INFO,
        .pApplicationName = "hostmem vk-compute",
        .apiVersion = VK_API_VERSION_1_1,
    };
    VkInstanceCreateInfo ici = {
        .sType = VK_STRUCTURE_TYPE_INSTANCE_CREATE_INFO,
        .pApplicationInfo = &app,
    };
    if (!check(vkCreateInstance(&ici, NULL, &inst), "vkCreateInstance"))
        goto out;
    uint32_t ndev = 1;
    VkPhysicalDevice phys = VK_NULL_HANDLE;
    VkResult r = vkEnumeratePhysicalDevices(inst, &ndev, &phys);
    if ((r != VK_SUCCESS && r != VK_INCOMPLETE) || ndev == 0) {
        check(r == VK_SUCCESS ? VK_ERROR_INITIALIZATION_FAILED : r, "vkEnumeratePhysicalDevices");
        goto out;
    }
    VkPhysicalDeviceDriverProperties drv = {
        .sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_DRIVER_PROPERTIES};
    VkPhysicalDeviceProperties2 props = {.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_PROPERTIES_2,
                                         .pNext = &drv};
    vkGetPhysicalDeviceProperties2(phys, &props);
    snprintf(device, sizeof device, "%s", props.properties.deviceName);
    driver_id = (int)drv.driverID;
    c.max_groups = props.properties.limits.maxComputeWorkGroupCount[0];
    if (c.max_groups > 4096)
        c.max_groups = 4096;
    vkGetPhysicalDeviceMemoryProperties(phys, &c.mem);

    uint32_t nq = 0;
    vkGetPhysicalDeviceQueueFamilyProperties(phys, &nq, NULL);
    VkQueueFamilyProperties qf[16];
    if (nq > 16)
        nq = 16;
    vkGetPhysicalDeviceQueueFamilyProperties(phys, &nq, qf);
    uint32_t family = UINT32_MAX;
    for (uint32_t i = 0; i < nq; i++)
        if (qf[i].queueFlags & VK_QUEUE_COMPUTE_BIT) {
            family = i;
            break;
        }
    if (family == UINT32_MAX) {
        check(VK_ERROR_FEATURE_NOT_PRESENT, "no compute queue");
        goto out;
    }
    float prio = 1.0f;
    VkDeviceQueueCreateInfo qci = {
        .sType = VK_STRUCTURE_TYPE_DEVICE_QUEUE_CREATE_INFO,
        .queueFamilyIndex = family,
        .queueCount = 1,
        .pQueuePriorities = &prio,
    };
    VkDeviceCreateInfo dci = {
        .sType = VK_STRUCTURE_TYPE_DEVICE_CREATE_INFO,
        .queueCreateInfoCount = 1,
        .pQueueCreateInfos = &qci,
    };
    if (!check(vkCreateDevice(phys, &dci, NULL, &c.dev), "vkCreateDevice"))
        goto out;
    vkGetDeviceQueue(c.dev, family, 0, &c.queue);

    VkDescriptorSetLayoutBinding bind = {
        .binding = 0,
        .descriptorType = VK_DESCRIPTOR_TYPE_STORAGE_BUFFER,
        .descriptorCount = 1,
        .stageFlags = VK_SHADER_STAGE_COMPUTE_BIT,
    };
    VkDescriptorSetLayoutCreateInfo dslci = {
        .sType = VK_STRUCTURE_TYPE_DESCRIPTOR_SET_LAYOUT_CREATE_INFO,
        .bindingCount = 1,
        .pBindings = &bind,
    };
    VkPushConstantRange pcr = {.stageFlags = VK_SHADER_STAGE_COMPUTE_BIT, .size = 8};
    VkPipelineLayoutCreateInfo plci = {
        .sType = VK_STRUCTURE_TYPE_PIPELINE_LAYOUT_CREATE_INFO,
        .setLayoutCount = 1,
        .pSetLayouts = &c.dsl,
        .pushConstantRangeCount = 1,
        .pPushConstantRanges = &pcr,
    };
    VkShaderModuleCreateInfo smci = {
        .sType = VK_STRUCTURE_TYPE_SHADER_MODULE_CREATE_INFO,
        .codeSize = sizeof vk_compute_spv,
        .pCode = vk_compute_spv,
    };
    VkShaderModule module;
    if (!check(vkCreateDescriptorSetLayout(c.dev, &dslci, NULL, &c.dsl),
               "vkCreateDescriptorSetLayout") ||
        !check(vkCreatePipelineLayout(c.dev, &plci, NULL, &c.layout), "vkCreatePipelineLayout") ||
        !check(vkCreateShaderModule(c.dev, &smci, NULL, &module), "vkCreateShaderModule"))
        goto out;
    VkComputePipelineCreateInfo cpci = {
        .sType = VK_STRUCTURE_TYPE_COMPUTE_PIPELINE_CREATE_INFO,
        .stage = {.sType = VK_STRUCTURE_TYPE_PIPELINE_SHADER_STAGE_CREATE_INFO,
                  .stage = VK_SHADER_STAGE_COMPUTE_BIT,
                  .module = module,
                  .pName = "main"},
        .layout = c.layout,
    };
    r = vkCreateComputePipelines(c.dev, VK_NULL_HANDLE, 1, &cpci, NULL, &c.pipeline);
    vkDestroyShaderModule(c.dev, module, NULL);
    if (!check(r, "vkCreateComputePipelines"))
        goto out;
    VkDescriptorPoolSize ps = {.type = VK_DESCRIPTOR_TYPE_STORAGE_BUFFER,
                               .descriptorCount = (uint32_t)live};
    VkDescriptorPoolCreateInfo dpci = {
        .sType = VK_STRUCTURE_TYPE_DESCRIPTOR_POOL_CREATE_INFO,
        .flags = VK_DESCRIPTOR_POOL_CREATE_FREE_DESCRIPTOR_SET_BIT,
        .maxSets = (uint32_t)live,
        .poolSizeCount = 1,
        .pPoolSizes = &ps,
    };
    VkCommandPoolCreateInfo cpi = {
        .sType = VK_STRUCTURE_TYPE_COMMAND_POOL_CREATE_INFO,
        .queueFamilyIndex = family,
    };
    if (!check(vkCreateDescriptorPool(c.dev, &dpci, NULL, &c.pool), "vkCreateDescriptorPool") ||
        !check(vkCreateCommandPool(c.dev, &cpi, NULL, &c.cmdpool), "vkCreateCommandPool"))
        goto out;

    struct buf bufs[256];
    memset(bufs, 0, sizeof bufs);
    unsigned steps = 0;
    while ((min << steps) < max)
        steps++;
    steps++;
    for (uint64_t first = 0; first < nbuf && !vk_errors; first += live) {
        uint64_t k = nbuf - first < live ? nbuf - first : live;
        // All k buffers exist and are mapped before the first dispatch.
        for (uint64_t j = 0; j < k && !vk_errors; j++) {
            uint64_t i = first + j;
            uint64_t size = min << (i % steps);
            if (size > max)
                size = max;
            setup(&c, &bufs[j], size & ~3ull, (uint32_t)(0x9e3779b9u * (uint32_t)(i + 1)));
        }
        for (uint64_t j = 0; j < k && !vk_errors; j++) {
            VkSubmitInfo si = {
                .sType = VK_STRUCTURE_TYPE_SUBMIT_INFO,
                .commandBufferCount = 1,
                .pCommandBuffers = &bufs[j].cmd,
            };
            check(vkQueueSubmit(c.queue, 1, &si, bufs[j].fence), "vkQueueSubmit");
        }
        for (uint64_t j = 0; j < k && !vk_errors; j++) {
            struct buf *b = &bufs[j];
            if (!check(vkWaitForFences(c.dev, 1, &b->fence, VK_TRUE, 120ull * 1000000000ull),
                       "vkWaitForFences"))
                break;
            if (b->live == 2) {
                VkMappedMemoryRange range = {
                    .sType = VK_STRUCTURE_TYPE_MAPPED_MEMORY_RANGE,
                    .memory = b->memory,
                    .size = VK_WHOLE_SIZE,
                };
                if (!check(vkInvalidateMappedMemoryRanges(c.dev, 1, &range),
                           "vkInvalidateMappedMemoryRanges"))
                    break;
            }
            uint32_t n = (uint32_t)(b->size / 4);
            uint64_t bad = 0;
            for (uint32_t i = 0; i < n; i++)
                if (b->map[i] != expect(i, b->seed, c.salt))
                    bad++;
            if (bad)
                fprintf(stderr, "vk-compute: buffer %" PRIu64 " (%" PRIu64 " bytes): %" PRIu64
                        " mismatches\n", first + j, b->size, bad);
            mismatches += bad;
            bytes += b->size;
            done++;
        }
        for (uint64_t j = 0; j < k; j++)
            release(&c, &bufs[j]);
    }

out:
    if (c.dev) {
        vkDeviceWaitIdle(c.dev);
        if (c.cmdpool)
            vkDestroyCommandPool(c.dev, c.cmdpool, NULL);
        if (c.pool)
            vkDestroyDescriptorPool(c.dev, c.pool, NULL);
        if (c.pipeline)
            vkDestroyPipeline(c.dev, c.pipeline, NULL);
        if (c.layout)
            vkDestroyPipelineLayout(c.dev, c.layout, NULL);
        if (c.dsl)
            vkDestroyDescriptorSetLayout(c.dev, c.dsl, NULL);
        vkDestroyDevice(c.dev, NULL);
    }
    if (inst)
        vkDestroyInstance(inst, NULL);
    for (char *q = first_error; *q; q++)
        if (*q == '"' || *q == '\\')
            *q = '\'';
    printf("VKTEST-RESULT {\"device\":\"%s\",\"driver_id\":%d,\"buffers\":%" PRIu64
           ",\"bytes_checked\":%" PRIu64 ",\"mismatches\":%" PRIu64 ",\"vk_errors\":%lu,"
           "\"first_error\":\"%s\",\"seconds\":%.2f}\n",
           device, driver_id, done, bytes, mismatches, vk_errors, first_error, now() - t0);
    fflush(stdout);
    return done == nbuf && !mismatches && !vk_errors ? 0 : 1;
}
