// Why this file exists: loads the addon node-gyp built (build/Release), for `import` from ESM
// through createRequire; its users are src/migration/ram-hash.ts and src/transport/tcp-info.ts.
module.exports = require('./build/Release/ferry_native.node');
