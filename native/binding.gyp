# Builds ferry_native.node from ramhash.c and tcpinfo.c. XXH3 comes from the xxHash sources the xxhash-addon
# npm package ships (header-only use: XXH_INLINE_ALL).
{
  "targets": [
    {
      "target_name": "ferry_native",
      "sources": ["ramhash.c", "tcpinfo.c"],
      "include_dirs": ["<!(node -p \"require('path').join(require('path').dirname(require.resolve('xxhash-addon/package.json')), 'xxHash')\")"],
      "cflags": ["-O3", "-Wall", "-Wextra"],
      "defines": ["NAPI_VERSION=8"]
    }
  ]
}
