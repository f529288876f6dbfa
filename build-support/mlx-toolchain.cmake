# CMake toolchain file that makes mlx-c (inside the mlx-sys crate) build against
# the prebuilt MLX from the PyPI wheel `mlx-cpu` instead of cloning MLX from
# GitHub. .cargo/config.toml points the cmake crate at this file on Linux;
# scripts/setup.sh unpacks the wheel into .deps/mlx-cpu.
get_filename_component(BLOSSOM_ROOT "${CMAKE_CURRENT_LIST_DIR}/.." ABSOLUTE)
set(BLOSSOM_MLX_WHEEL "${BLOSSOM_ROOT}/.deps/mlx-cpu")
if(NOT EXISTS "${BLOSSOM_MLX_WHEEL}/mlx/share/cmake/MLX/MLXConfig.cmake")
  message(FATAL_ERROR
    "The MLX wheel is missing from ${BLOSSOM_MLX_WHEEL}. Run: bash scripts/setup.sh")
endif()

set(MLX_C_USE_SYSTEM_MLX ON CACHE BOOL "" FORCE)
set(MLX_C_BUILD_EXAMPLES OFF CACHE BOOL "" FORCE)
set(MLX_DIR "${BLOSSOM_MLX_WHEEL}/mlx/share/cmake/MLX" CACHE PATH "" FORCE)

# The toolchain file is read more than once (project(), try_compile); add the
# compat header only once.
set(BLOSSOM_COMPAT_FLAG "-include ${CMAKE_CURRENT_LIST_DIR}/mlx-compat.h")
string(FIND "${CMAKE_CXX_FLAGS}" "${BLOSSOM_COMPAT_FLAG}" BLOSSOM_COMPAT_AT)
if(BLOSSOM_COMPAT_AT EQUAL -1)
  set(CMAKE_CXX_FLAGS "${CMAKE_CXX_FLAGS} ${BLOSSOM_COMPAT_FLAG}")
endif()
