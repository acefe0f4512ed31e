# nvfp4cal_project_target(TARGET): warnings as errors and strict floating point for project code.
#
# -ffp-contract=off: the numerics define exactly where products are rounded (docs/numerics.md);
# a fused multiply-add would change bits and break CPU/GPU agreement.
function(nvfp4cal_project_target target)
  target_compile_options(${target} PRIVATE
    $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Wpedantic -Wshadow -Wconversion -Wno-sign-conversion -Werror -Wno-psabi -ffp-contract=off>
    $<$<COMPILE_LANGUAGE:CUDA>:-Xcompiler=-Wall,-Wextra,-ffp-contract=off --Werror=all-warnings>)
endfunction()
