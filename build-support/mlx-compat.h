// Force-included (`-include`) into every C++ file of mlx-c when it is built on
// Linux against the prebuilt MLX wheel. See docs/MLX_ON_LINUX.md.
#pragma once
#ifdef __cplusplus
#include <cstdint>

// mlx-c's half.h declares these only on ARM. On x86_64 the C wrappers still
// name them; MLX itself stores half floats as 16-bit words, so uint16_t is the
// layout-correct stand-in (bindgen is told separately what to see).
#if !defined(__aarch64__)
#define HAS_FLOAT16
#define HAS_BFLOAT16
typedef uint16_t float16_t;
typedef uint16_t bfloat16_t;
#endif

// libstdc++ 12 (Debian 12) has no <format>. mlx-c only formats error messages
// with plain "{}" placeholders, so a minimal stand-in is enough.
#if !__has_include(<format>)
#include <sstream>
#include <string>
#include <string_view>
namespace std {
namespace blossom_compat {
inline void format_into(ostringstream& out, string_view fmt) { out << fmt; }
template <class First, class... Rest>
void format_into(ostringstream& out, string_view fmt, const First& first, const Rest&... rest) {
  const auto at = fmt.find("{}");
  if (at == string_view::npos) {
    out << fmt;
    return;
  }
  out << fmt.substr(0, at) << first;
  format_into(out, fmt.substr(at + 2), rest...);
}
}  // namespace blossom_compat
template <class... Args>
string format(string_view fmt, const Args&... args) {
  ostringstream out;
  blossom_compat::format_into(out, fmt, args...);
  return out.str();
}
}  // namespace std
#endif
#endif
