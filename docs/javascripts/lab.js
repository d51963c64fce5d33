// Filter the home table of hypotheses by track.
(function () {
  function setup() {
    var select = document.getElementById("lab-track-filter");
    var table = document.getElementById("lab-hypotheses");
    if (!select || !table) return;
    select.addEventListener("change", function () {
      var rows = table.querySelectorAll("tbody tr");
      for (var i = 0; i < rows.length; i++) {
        var show = !select.value || rows[i].getAttribute("data-track") === select.value;
        rows[i].style.display = show ? "" : "none";
      }
    });
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", setup);
  else setup();
})();
