// Compiled by tests/layering (never linked): includes the one header named by
// NVFP4CAL_PROBE_HEADER, so that the build says whether the target may see it.
#include NVFP4CAL_PROBE_HEADER

// Not an empty translation unit (-Wpedantic) whatever the header holds.
int nvfp4cal_include_probe();
