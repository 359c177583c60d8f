#version 450
// Each element becomes a function of its value and index: a lost, stale or misplaced page shows.
layout(local_size_x = 64) in;
layout(std430, set = 0, binding = 0) buffer Data { uint v[]; } data;
layout(push_constant) uniform Params { uint n; uint salt; } p;
void main() {
    uint stride = gl_NumWorkGroups.x * gl_WorkGroupSize.x;
    for (uint i = gl_GlobalInvocationID.x; i < p.n; i += stride) {
        data.v[i] = data.v[i] * 2654435761u + (i ^ p.salt);
    }
}
