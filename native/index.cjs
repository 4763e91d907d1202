// Why this file exists: loads the addon node-gyp built (build/Release), for `import` from ESM
// through createRequire; src/util/native.ts loads it for its users.
module.exports = require('./build/Release/ferry_native.node');
