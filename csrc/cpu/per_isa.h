// The rule of csrc/cpu/: its headers hold CPU kernel code that each op's <op>_cpu*.cpp compiles
// once per CPU capability (DEFAULT, AVX2, AVX512: CMake defines CPU_CAPABILITY for those builds
// only, and only they have csrc/ on their include path). Each header puts its code in
// tokenmix::cpu::CPU_CAPABILITY, an inline namespace named after the build, as ATen does for its
// own vectorised code: the builds' copies of an inline function or template are then distinct
// symbols, and the linker can never hand an AVX-512 copy to a processor without AVX-512.
#pragma once

#if !defined(CPU_CAPABILITY)
#error "per-capability code: include only from an op's <op>_cpu*.cpp"
#endif
